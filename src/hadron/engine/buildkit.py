"""The BuildKit executor: each package build runs as one BuildKit build on a Docker daemon.

Hadron's scheduler keeps the graph and the cache keys; this executor only decides which worker
(a daemon address) runs a package, and runs it there as a build of a generated Dockerfile:

    FROM hadron-buildenv:<env digest hex>   the locked build environment, loaded into the daemon
    COPY sources, sysroot, recipe, steps    exact inputs: the fetched sources and the dependency
                                            outputs staged as the local executor stages them
    RUN steps/run.sh                        unpack and every phase, with the local executor's
                                            environment (SOURCE_DATE_EPOCH included)
    FROM scratch; COPY /destdir, /meta      exported with --output type=local

``docker build`` runs with ``--network=none`` and ``--no-cache`` (Hadron's cache is the cache).
The exported tree is split and committed exactly as a local build's, so the same package gives the
same output digest from either executor. Debian 12's Docker (20.10) embeds BuildKit: it is driven
through ``/usr/bin/docker`` with ``DOCKER_BUILDKIT=1``; a worker address is a daemon socket
(``unix:///run/docker.sock``, ``tcp://host:2375``).
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from hadron import runner
from hadron.engine import buildsys, faults
from hadron.engine.buildenv import BuildEnv
from hadron.engine.cache import Cache, Output, split_tree
from hadron.engine.executor import (
    BuildRequest,
    build_in_cache,
    build_record,
    check_kconfig,
    snapshot_folder,
    source_target,
    stage_sysroot,
    step_environment,
    unpack_script,
)
from hadron.engine.recipe import KbuildBuild
from hadron.errors import BuildError, HadronError

DOCKER = "/usr/bin/docker"  # Debian's CLI: it drives the daemon's BuildKit without buildx
DEFAULT_WORKER = "unix:///var/run/docker.sock"
IMAGE = "hadron-buildenv"
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = (DOCKER, "skopeo")


def parse_workers(spec: str | None) -> list[str]:
    """``buildkit`` or ``buildkit=ADDR,ADDR…`` -> worker addresses."""
    if spec is None or spec == "buildkit":
        return [DEFAULT_WORKER]
    name, _, addrs = spec.partition("=")
    workers = [a.strip() for a in addrs.split(",") if a.strip()]
    if name != "buildkit" or not workers:
        raise HadronError(f"--executor {spec!r}: expected local, buildkit or buildkit=ADDR[,ADDR…]")
    for w in workers:
        if not w.startswith(("unix://", "tcp://", "ssh://")):
            raise HadronError(f"--executor: worker {w!r} is not a Docker daemon address",
                              hint="use unix:///path/to/docker.sock or tcp://host:port")
    return workers


class Worker:
    def __init__(self, address: str) -> None:
        self.address = address
        self.loaded: set[str] = set()

    def docker(self, *args: str, what: str, **kw: Any) -> Any:
        return runner.run([DOCKER, "-H", self.address, *args], what=f"{what} on {self.address}",
                          env={"DOCKER_BUILDKIT": "1"}, **kw)

    def ensure_env(self, env: BuildEnv) -> str:
        """Load the build environment into this daemon once; returns the image reference."""
        hexd = env.digest.removeprefix("sha256:")
        ref = f"{IMAGE}:{hexd}"
        if hexd in self.loaded:
            return ref
        manifest = json.loads((env.oci / "blobs" / "sha256" / hexd).read_text())
        want_id = manifest["config"]["digest"]
        res = self.docker("image", "inspect", "--format", "{{.Id}}", ref, what="docker image inspect", check=False)
        if res.returncode != 0 or res.stdout.strip() != want_id:
            runner.run(["skopeo", "copy", "--quiet", "--dest-daemon-host", self.address,
                        f"oci:{env.oci}:buildenv", f"docker-daemon:{ref}"], what=f"loading {ref} into {self.address}")
            res = self.docker("image", "inspect", "--format", "{{.Id}}", ref, what="docker image inspect")
            if res.stdout.strip() != want_id:
                raise HadronError(f"{self.address} holds {ref} as {res.stdout.strip()}, not {want_id}")
        self.loaded.add(hexd)
        return ref


class BuildKitExecutor:
    """Runs package builds on BuildKit workers (Docker daemons), one build per worker at a time."""

    jobserver = None  # each worker runs its build with all of its own CPUs

    def __init__(self, cache: Cache, env: BuildEnv, workers: list[str]) -> None:
        self.cache = cache
        self.env = env
        self.workers = [Worker(a) for a in workers]
        self._free: queue.Queue[Worker] = queue.Queue()
        for w in self.workers:
            self._free.put(w)
        self.used: dict[str, list[str]] = {w.address: [] for w in self.workers}

    def build(self, req: BuildRequest) -> Output:
        worker = self._free.get()
        try:
            out = build_in_cache(self.cache, req,
                                 lambda tmp, log, log_path: self._run(req, worker, tmp, log, log_path))
            if not out.reused:
                self.used[worker.address].append(req.name)
            return out
        finally:
            self._free.put(worker)

    def _run(self, req: BuildRequest, worker: Worker, tmp: Path, log: Any, log_path: Path) -> dict[str, Any]:
        r = req.recipe.recipe
        started = time.time()
        timings: dict[str, float] = {}
        log.write(f"==> {r.name} {r.version} key {req.key} on BuildKit worker {worker.address}\n".encode())
        log.flush()
        req.on_phase("load environment")
        image = worker.ensure_env(self.env)
        ctx = tmp / "context"
        t0 = time.monotonic()
        stage_sysroot(req.inputs, ctx / "sysroot")
        (ctx / "sources").mkdir()
        for i, (f, s) in enumerate(zip(req.sources, r.sources, strict=True)):
            dest = ctx / source_target(i, s.name).lstrip("/")
            try:
                os.link(f.path, dest)
            except OSError:
                shutil.copyfile(f.path, dest)
        if req.recipe.folder is not None:
            snapshot_folder(req, ctx / "recipe")
        else:
            (ctx / "recipe").mkdir()
        kbuild = isinstance(r.build, KbuildBuild) and bool(r.build.fragments)
        self._write_steps(req, ctx / "steps", kbuild=kbuild)
        (ctx / "Dockerfile").write_text(
            f"FROM {image}\nCOPY sources /sources\nCOPY sysroot /sysroot\nCOPY recipe /recipe\n"
            "COPY steps /hadron-steps\nRUN [\"/bin/sh\", \"/hadron-steps/run.sh\"]\n"
            "FROM scratch\nCOPY --from=0 /destdir /destdir\nCOPY --from=0 /hadron-meta /meta\n")
        timings["stage"] = round(time.monotonic() - t0, 3)

        req.on_phase("buildkit")
        t0 = time.monotonic()
        export = tmp / "export"
        res = worker.docker("build", "--network=none", "--no-cache", "--progress=plain", "--output",
                            f"type=local,dest={export}", str(ctx), what=f"docker build of {r.name}", stdout=log,
                            check=False)
        log.write(res.stderr.encode())
        timings["buildkit"] = round(time.monotonic() - t0, 3)
        log.write(f"==> buildkit: exit {res.returncode} after {timings['buildkit']:.1f}s\n".encode())
        log.flush()
        if res.returncode != 0:
            raise BuildError(f"the BuildKit build on {worker.address} failed (exit status {res.returncode})",
                             hint=f"see the log: {log_path}")
        if kbuild:
            assert req.recipe.folder is not None
            check_kconfig(req, ctx / "recipe", (export / "meta" / "kconfig").read_text(), log, log_path)
        faults.point("after-build")
        t0 = time.monotonic()
        split_tree(export / "destdir", tmp / "out", r.dev_globs(), r.drop_globs())
        timings["split"] = round(time.monotonic() - t0, 3)
        return build_record(req, started=started, timings=timings, log_path=log_path,
                            isolation=f"BuildKit (Docker daemon {worker.address}): --network=none",
                            build_env=req.env_identity)

    @staticmethod
    def _write_steps(req: BuildRequest, steps: Path, *, kbuild: bool) -> None:
        """run.sh: the environment, then unpack and each phase in its own shell, as the local
        executor runs them (cwd, JOBS, MAKEFLAGS), each announced in the log."""
        steps.mkdir()
        env = step_environment(req)
        lines = ["set -eu", *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
                 'JOBS=$(nproc); export JOBS; MAKEFLAGS="-j$JOBS"; export MAKEFLAGS',
                 "mkdir -p /src /build /destdir /hadron-meta \"$HOME\""]
        scripts: list[tuple[str, str, str]] = []
        if req.sources:
            scripts.append(("unpack", unpack_script(req), "/src"))
        scripts += [(p.name, p.script, "/build") for p in buildsys.phases(req.recipe.recipe, check=req.run_check)]
        for n, (name, script, cwd) in enumerate(scripts):
            f = f"{n:02d}-{name}.sh"
            (steps / f).write_text(script + "\n")
            lines += [f"echo '==> {name}'", f"(cd {cwd} && /bin/sh /hadron-steps/{f})"]
        if kbuild:
            lines.append("cp /build/_b/.config /hadron-meta/kconfig")
        (steps / "run.sh").write_text("\n".join(lines) + "\n")
