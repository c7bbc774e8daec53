"""No-op rebuild of hadron versus BuildKit's, side by side on the same synthetic graph.

hadron builds the synthetic distribution of ``synthgraph`` (N make-style packages, default 150); BuildKit
(``docker build`` with DOCKER_BUILDKIT=1, Debian's docker.io 20.10) builds one multi-stage Dockerfile of
the same dependency graph: one stage per package, ``COPY --from`` of each dependency's output and a
trivial ``RUN``. After a cold build of each, the two no-op rebuilds (everything cached) are timed in
turns, each as the wall-clock time of the whole client process. Goal: hadron median / BuildKit median
<= 0.5. Needs Debian's docker.io and busybox-static; starts dockerd itself if none answers.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from synthgraph import hadron, synthetic_project

DOCKER = "/usr/bin/docker"  # Debian's 20.10 client; the newer one first on PATH has no buildx and fails
DOCKERD = "/usr/sbin/dockerd"
BUSYBOX = Path("/bin/busybox")  # busybox-static: the base image's only program
BASE = "hadron-bench/base:1"
GOAL = 0.5
HADRON_PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hadron"


def docker(*args: str, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    res = subprocess.run([DOCKER, *args], env=dict(os.environ, DOCKER_BUILDKIT="1"), input=stdin,
                         capture_output=True)
    if check and res.returncode != 0:
        raise SystemExit(f"docker {' '.join(args[:2])} failed:\n{res.stderr.decode(errors='replace')[-3000:]}")
    return res


@contextmanager
def docker_daemon(log: Path) -> Iterator[None]:
    """Use the running Docker daemon, or start dockerd for the duration (and stop it by its pid)."""
    if docker("info", check=False).returncode == 0:
        yield
        return
    if not Path(DOCKERD).exists():
        raise SystemExit(f"no Docker daemon answers and {DOCKERD} is missing: apt-get install docker.io")
    with log.open("wb") as out:
        proc = subprocess.Popen([DOCKERD], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while docker("info", check=False).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                why = f"it exited with status {proc.returncode}" if proc.poll() is not None else "no answer in 60 s"
                raise SystemExit(f"no Docker daemon answers and {DOCKERD} could not be started ({why}); its log:\n"
                                 f"{tail}\nStart a Docker daemon (as root, with docker.io installed) and rerun.")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ensure_base(tmp: Path) -> None:
    """Import a scratch-like image holding a static busybox and its applets as symlinks (no registry needed)."""
    if docker("image", "inspect", BASE, check=False).returncode == 0:
        return
    if not BUSYBOX.exists():
        raise SystemExit(f"{BUSYBOX} is missing: apt-get install busybox-static")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    tarball = tmp / "base.tar"
    with tarfile.open(tarball, "w") as tf:
        tf.add(BUSYBOX, arcname="bin/busybox")
        for name in applets:
            if name != "busybox":
                link = tarfile.TarInfo(f"bin/{name}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tf.addfile(link)
    docker("import", str(tarball), BASE)


def dockerfile(deps: dict[str, list[str]]) -> str:
    """One stage per package; a final stage mounts every leaf so that the build needs every stage. It mounts
    rather than COPYs: one layer however many leaves (an overlay2 image holds at most ~125 layers)."""
    parts = []
    for name, ds in deps.items():
        copies = "".join(f"COPY --from={d} /out/{d} /out/{d}\n" for d in ds)
        parts.append(f"FROM {BASE} AS {name}\n{copies}"
                     f"RUN d=$(ls /out 2>/dev/null); mkdir -p /out/{name} && echo {name} $d > /out/{name}/f\n")
    used = {d for ds in deps.values() for d in ds}
    leaves = [n for n in deps if n not in used]
    mounts = "".join(f" \\\n    --mount=type=bind,from={n},source=/out/{n},target=/in/{n}" for n in leaves)
    parts.append(f"FROM {BASE} AS all\nRUN{mounts} \\\n    cat /in/*/f > /all\n")
    return "\n".join(parts)


def buildkit(ctx: Path, tag: str) -> tuple[float, str]:
    """``docker build`` of ``ctx``; returns (wall-clock seconds, plain progress output)."""
    t0 = time.monotonic()
    res = docker("build", "--network=none", "--progress=plain", "-t", tag, str(ctx))
    return time.monotonic() - t0, res.stderr.decode(errors="replace")


def assert_all_cached(progress: str, n: int) -> None:
    """Every COPY and RUN step of a BuildKit no-op is CACHED, and all n + 1 RUN steps were there."""
    steps = dict(re.findall(r"^#(\d+) \[[^\]]+\] ((?:RUN|COPY) .*)$", progress, re.M))
    cached = set(re.findall(r"^#(\d+) CACHED$", progress, re.M))
    ran = [steps[v] for v in steps if v not in cached]
    runs = sum(s.startswith("RUN") for s in steps.values())
    assert not ran and runs == n + 1, f"BuildKit no-op was not all cached ({runs} RUN steps); ran: {ran[:5]}"


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--packages", type=int, default=150, help="packages in the graph (default 150)")
    ap.add_argument("--runs", type=int, default=7, help="no-op rebuilds of each, interleaved (default 7, min 5)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be at least 5")
    n: int = args.packages
    tag = f"hadron-bench/graph:{n}"
    # hadron as installed: with its bytecode (scripts/host-setup compiles it; a source edit since, or
    # PYTHONDONTWRITEBYTECODE, would otherwise make every run compile every module it imports).
    compileall.compile_dir(HADRON_PACKAGE, quiet=1)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        stack.enter_context(docker_daemon(tmp / "dockerd.log"))
        proj, deps = stack.enter_context(synthetic_project(tmp / "proj", n))
        cache = tmp / "cache"
        ctx = tmp / "ctx"
        ctx.mkdir()
        (ctx / "Dockerfile").write_text(dockerfile(deps))
        ensure_base(tmp)
        hadron_cold, _ = hadron(proj, cache, "build")
        buildkit_reused = docker("image", "inspect", tag, check=False).returncode == 0
        buildkit_cold, _ = buildkit(ctx, tag)
        h_times: list[float] = []
        b_times: list[float] = []
        for _ in range(args.runs):
            dt, res = hadron(proj, cache, "build")
            pk = res["packages"]
            assert isinstance(pk, dict) and len(pk) == n and all(p["status"] == "cached" for p in pk.values())
            h_times.append(dt)
            dt, progress = buildkit(ctx, tag)
            assert_all_cached(progress, n)
            b_times.append(dt)
    h, b = summary(h_times), summary(b_times)
    ratio = h["median"] / b["median"]
    if args.json:
        print(json.dumps({"packages": n, "runs": args.runs, "hadron_cold_s": hadron_cold,
                          "buildkit_cold_s": buildkit_cold, "buildkit_cold_reused_cache": buildkit_reused,
                          "hadron_noop_s": h, "buildkit_noop_s": b, "hadron_noop_runs_s": h_times,
                          "buildkit_noop_runs_s": b_times, "ratio": ratio, "goal_ratio_max": GOAL,
                          "goal_met": ratio <= GOAL}, indent=2))
        return
    note = " (BuildKit cache kept from an earlier run: not cold)" if buildkit_reused else ""
    print(f"packages / stages:   {n} / {n + 1} (one per package + a final one)")
    print(f"cold build:          hadron {hadron_cold:.1f} s, BuildKit {buildkit_cold:.1f} s{note}")
    for label, s in (("hadron", h), ("BuildKit", b)):
        print(f"{label + ' no-op:':<21}median {s['median']:.3f} s (min {s['min']:.3f}, max {s['max']:.3f}; "
              f"whole client process, {args.runs} runs, interleaved)")
    print(f"ratio:               {ratio:.2f} (hadron median / BuildKit median)")
    print(f"goal ratio <= {GOAL}:   {'met' if ratio <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
