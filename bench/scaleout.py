"""Scale-out figures, each side by side in one run (these machines are noisy):

1. bwrap vs BuildKit per package: the closure of --packages built cold twice, in two fresh caches
   seeded with the same sources and the locked build environment, once by the local executor and
   once by the BuildKit executor on a Docker daemon this script starts; per-package seconds, their
   ratio, and whether the output digests agree.
2. cold vs warm-from-registry for --image: a cold build of the image's packages in a fresh cache
   (sources seeded: compile time only), `hadron cache push` to a local registry, then the same build
   in an empty cache that trusts the builder's key (the second machine); wall times and their ratio.

Sources and the environment come from $HADRON_CACHE (the cache a `hadron fetch` filled). The
registry and the daemon are stopped by their own pids.

    /opt/hadron/venv/bin/python bench/scaleout.py --packages zlib,musl --image core
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hadron.engine import buildenv, remote
from hadron.layout import CacheLayout
from services import Registry, start_dockerd

ROOT = Path(__file__).resolve().parents[1]


def hadron(proj: Path, cache: Path, *args: str) -> tuple[float, dict[str, object]]:
    env = dict(os.environ, HADRON_CACHE=str(cache))
    env.pop("HADRON_CONFIG", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "hadron", *args, "--json"], cwd=proj, env=env, text=True,
                         capture_output=True)
    took = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"hadron {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return took, json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}


def seeded_cache(path: Path, source_cache: Path, env: buildenv.BuildEnv) -> Path:
    (path / "buildenv").mkdir(parents=True)
    subprocess.run(["cp", "-al", str(source_cache / "sources"), str(path / "sources")], check=True)
    subprocess.run(["cp", "-al", str(env.path), str(path / "buildenv")], check=True)
    return path


def project(base: Path, toolchain: str, extra: str = "") -> Path:
    proj = base / "proj"
    if not proj.exists():
        (proj / "distro").mkdir(parents=True)
        for sub in ("packages", "toolchains", "images"):
            (proj / "distro" / sub).symlink_to(ROOT / "distro" / sub)
        shutil.copyfile(ROOT / "buildenv.lock", proj / "buildenv.lock")
    (proj / "hadron.toml").write_text(f'[build]\ntoolchain = "{toolchain}"\n{extra}')
    return proj


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(143))  # run the cleanups: daemon, registry, temp dir
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", default="zlib,musl,util-linux", help="comma-separated; their closure is built")
    ap.add_argument("--image", default="core", help="image for cold vs warm ('' to skip)")
    ap.add_argument("--toolchain", default="host")
    ap.add_argument("--keep", type=Path,
                    help="move the work directory (caches, logs) here at the end, even after a failure")
    args = ap.parse_args()
    source_cache = Path(os.environ.get("HADRON_CACHE", Path.home() / ".cache" / "hadron"))
    lock = buildenv.read_lock(ROOT)
    assert lock is not None
    env = buildenv.find(CacheLayout(source_cache), lock.digest)
    if env is None:
        raise SystemExit(f"the locked environment is not in {source_cache}: run `hadron buildenv build` first")

    with tempfile.TemporaryDirectory(prefix="hadron-bench-scaleout-", dir="/var/tmp") as td:
        base = Path(td)
        try:
            run(args, base, source_cache, env)
        finally:
            if args.keep is not None:  # kept after a failure too: its logs say why
                shutil.move(str(base), args.keep)
                base.mkdir()


def run(args: argparse.Namespace, base: Path, source_cache: Path, env: buildenv.BuildEnv) -> None:
    proj = project(base, args.toolchain)
    if args.packages:
        daemon = start_dockerd(base, "bench")
        try:
            pkgs = args.packages.split(",")
            t_b, local = hadron(proj, seeded_cache(base / "c-bwrap", source_cache, env), "build", *pkgs)
            t_k, bk = hadron(proj, seeded_cache(base / "c-buildkit", source_cache, env), "build", *pkgs,
                             "--executor", f"buildkit={daemon.address}")
        finally:
            daemon.stop()
        print(f"{'package':<16}{'bwrap s':>9}{'BuildKit s':>12}{'ratio':>7}  same output")
        lp, kp = local["packages"], bk["packages"]
        assert isinstance(lp, dict) and isinstance(kp, dict)
        for n in lp:
            same = (Path(lp[n]["output"]) / "digest").read_text() == (Path(kp[n]["output"]) / "digest").read_text()
            a, b = _seconds(lp[n]), _seconds(kp[n])
            print(f"{n:<16}{a:>9.1f}{b:>12.1f}{b / a if a else 0:>7.2f}  {'yes' if same else 'NO'}")
        print(f"{'(wall)':<16}{t_b:>9.1f}{t_k:>12.1f}{t_k / t_b:>7.2f}")

    if args.image:
        reg = Registry(base / "registry")
        reg.start()
        try:
            secret, public = remote.generate_key("bench", base / "keys")
            cfg = f'[cache]\nremote = "{reg.address}/hadron/cache"\ntls_verify = false\n'
            project(base, args.toolchain, cfg + f'signing_key = "{secret}"\npush = false\n')
            t_cold, cold = hadron(proj, seeded_cache(base / "c-cold", source_cache, env), "build", args.image)
            t_push, _ = hadron(proj, base / "c-cold", "cache", "push", args.image)
            project(base, args.toolchain, cfg + f"trusted_keys = [{json.dumps(public.read_text().strip())}]\n")
            warm_cache = base / "c-warm"
            (warm_cache / "buildenv").mkdir(parents=True)
            subprocess.run(["cp", "-al", str(env.path), str(warm_cache / "buildenv")], check=True)
            t_warm, warm = hadron(proj, warm_cache, "build", args.image)
        finally:
            reg.stop()
        cp, wp = cold["packages"], warm["packages"]
        assert isinstance(cp, dict) and isinstance(wp, dict)
        statuses = sorted({str(p["status"]) for p in wp.values()})
        same = all((Path(cp[n]["output"]) / "digest").read_text() == (Path(wp[n]["output"]) / "digest").read_text()
                   for n in cp)
        size = sum(f.stat().st_size for f in (base / "registry").rglob("*") if f.is_file())
        print(f"\n{args.image}: {len(cp)} packages")
        print(f"  cold build (sources present)   {t_cold:8.1f} s")
        print(f"  hadron cache push              {t_push:8.1f} s  (registry now {size / 1e6:.0f} MB)")
        print(f"  warm build from the registry   {t_warm:8.1f} s  statuses {statuses}, outputs identical: {same}")
        print(f"  warm / cold                    {t_warm / t_cold:8.3f}")


def _seconds(p: object) -> float:
    assert isinstance(p, dict)
    manifest = json.loads((Path(p["output"]) / "manifest.json").read_text())
    return float(manifest["finished"] - manifest["started"])


if __name__ == "__main__":
    main()
