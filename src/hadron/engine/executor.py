"""Executors build one package whose inputs are ready. The local executor runs each phase in a
fresh bubblewrap sandbox; other executors (e.g. BuildKit) implement the same small interface."""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from hadron import BUILD_LOGIC_VERSION
from hadron.engine import buildsys, faults, sandbox
from hadron.engine.cache import Cache, Output, remove_tree, split_tree
from hadron.engine.fetch import Fetched
from hadron.engine.jobs import JobServer
from hadron.engine.recipe import KbuildBuild, LoadedRecipe, digest_folder
from hadron.engine.toolchain import FLAG_VARIABLES, Toolchain
from hadron.errors import BuildError, HadronError


@dataclass(frozen=True)
class BuildRequest:
    recipe: LoadedRecipe
    key: str
    sources: Sequence[Fetched]
    inputs: dict[str, Output]  # every package staged into /sysroot
    env_identity: str
    toolchain: Toolchain
    source_date_epoch: int
    arch: str = "x86_64"
    extra_path: Sequence[str] = ()
    run_check: bool = True
    env_root: Path | None = None  # the build environment's tree (None: the host's /usr)
    on_phase: Callable[[str], None] = field(default=lambda _p: None)

    @property
    def name(self) -> str:
        return self.recipe.name


class Executor(Protocol):
    def build(self, req: BuildRequest) -> Output: ...


KERNEL_ARCH = {"x86_64": "x86_64", "aarch64": "arm64", "riscv64": "riscv"}


def kernel_arch(arch: str) -> str:
    """The kernel's ARCH= for a Hadron target architecture."""
    try:
        return KERNEL_ARCH[arch]
    except KeyError:
        raise HadronError(
            f"no kernel architecture is known for target {arch!r}",
            hint="supported: " + ", ".join(sorted(KERNEL_ARCH)) + " (build.arch in hadron.toml)",
        ) from None


def stage_sysroot(inputs: dict[str, Output], root: Path) -> None:
    """Merge the inputs' runtime and dev trees into ``root`` with hard links.

    Two inputs may ship the same path only with identical content."""
    owner: dict[str, str] = {}
    root.mkdir(parents=True, exist_ok=True)
    for name in sorted(inputs):
        out = inputs[name]
        for tree in (out.runtime, out.dev):
            for dirpath, dirnames, filenames in os.walk(tree):
                base = Path(dirpath)
                rel_base = base.relative_to(tree)
                for d in list(dirnames):
                    src = base / d
                    dst = root / rel_base / d
                    if src.is_symlink():
                        filenames.append(d)
                        dirnames.remove(d)
                    elif not dst.is_dir():
                        if dst.is_symlink():  # e.g. lib -> usr/lib provided by another input
                            dirnames.remove(d)
                            _merge_into_link(src, dst, root, name, owner)
                            continue
                        dst.mkdir()
                        dst.chmod(stat.S_IMODE(src.stat().st_mode) | 0o700)
                for f in filenames:
                    src = base / f
                    rel = (rel_base / f).as_posix()
                    dst = root / rel
                    _link_one(src, dst, rel, name, owner)


def _link_one(src: Path, dst: Path, rel: str, name: str, owner: dict[str, str]) -> None:
    if dst.exists() or dst.is_symlink():
        if _same(src, dst):
            return
        raise BuildError(
            f"inputs {owner.get(rel, '?')} and {name} both install /{rel} with different content",
            hint="only one package may own a path; move it to one package's outputs",
        )
    if src.is_symlink():
        dst.symlink_to(os.readlink(src))
    else:
        os.link(src, dst)
    owner[rel] = name


def _merge_into_link(src_dir: Path, link: Path, root: Path, name: str, owner: dict[str, str]) -> None:
    target = link.resolve()
    for dirpath, _dirs, files in os.walk(src_dir):
        for f in files:
            s = Path(dirpath) / f
            rel = s.relative_to(src_dir)
            d = target / rel
            d.parent.mkdir(parents=True, exist_ok=True)
            _link_one(s, d, (d.relative_to(root)).as_posix(), name, owner)


def _same(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    sa, sb = a.stat(), b.stat()
    if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
        return True
    return sa.st_size == sb.st_size and a.read_bytes() == b.read_bytes()


def step_environment(req: BuildRequest, variation: sandbox.Variation = sandbox.STANDARD) -> dict[str, str]:
    """The environment every step of ``req`` runs with (both executors). A variation changes what
    the machine would set (time zone, locale); the toolchain profile and the recipe still decide."""
    r = req.recipe.recipe
    env = sandbox.base_env(req.source_date_epoch)
    env.update(variation.env)
    env["PATH"] = ":".join([*req.toolchain.path, *req.extra_path, env["PATH"]])
    env.update(
        DESTDIR="/destdir",
        SYSROOT="/sysroot",
        PKG_CONFIG_SYSROOT_DIR="/sysroot",
        PKG_CONFIG_LIBDIR="/sysroot/usr/lib/pkgconfig:/sysroot/usr/share/pkgconfig",
        KBUILD_BUILD_TIMESTAMP=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(req.source_date_epoch)),
        KBUILD_BUILD_USER="hadron",
        KBUILD_BUILD_HOST="hadron",
        HADRON_PACKAGE=r.name,
        HADRON_VERSION=r.version,
        HADRON_ARCH=req.arch,
    )
    if r.depends.toolchain:
        env.update(req.toolchain.step_env())
    else:
        env.update(Toolchain("none").step_env())
    if isinstance(r.build, KbuildBuild):
        # Kbuild's names for the target architecture and the compiler prefix (the profile's kernel
        # one, not its user-space one); read by every make call of the recipe, install included.
        env["ARCH"] = kernel_arch(req.arch)
        env["CROSS_COMPILE"] = env.get("HADRON_KERNEL_CROSS_COMPILE", "")
        # The profile's user-space compile and link flags are not the kernel's.
        for var in FLAG_VARIABLES:
            env.pop(var, None)
    env.update(r.build.env)
    return env


def source_target(index: int, name: str) -> str:
    """Where source ``index`` is seen during the unpack step."""
    return f"/sources/{index}-{name}"


def unpack_script(req: BuildRequest) -> str:
    """The unpack step: each source from :func:`source_target` into /src."""
    cmds = ["set -eu"]
    for i, s in enumerate(req.recipe.recipe.sources):
        target = source_target(i, s.name)
        dest = f"/src/{s.destination}".rstrip("/")
        cmds.append(f"mkdir -p '{dest}'")
        if s.extract:
            cmds.append(
                f"tar -xf '{target}' -C '{dest}' --strip-components={s.strip_components} "
                "--no-same-owner --no-same-permissions --delay-directory-restore"
            )
        else:
            cmds.append(f"cp '{target}' '{dest}/{s.name}'")
    return "\n".join(cmds)


def build_record(req: BuildRequest, *, started: float, timings: dict[str, float], log_path: Path,
                 isolation: str, build_env: str) -> dict[str, Any]:
    """What the manifest records about a build besides its files."""
    r = req.recipe.recipe
    return {
        "name": r.name,
        "version": r.version,
        "license": r.license,
        "build_logic": BUILD_LOGIC_VERSION,
        "sources": [
            {"name": s.name, "url": s.url, "sha256": f.digest, "fetched_from": f.origin}
            for f, s in zip(req.sources, r.sources, strict=True)
        ],
        "inputs": {n: o.digest() for n, o in sorted(req.inputs.items())},
        "env_identity": req.env_identity,
        "toolchain": req.toolchain.name,
        "isolation": isolation,
        "build_env": build_env,
        "started": round(started, 3),
        "finished": round(time.time(), 3),
        "timings": timings,
        "log": str(log_path),
    }


def check_kconfig(req: BuildRequest, folder: Path, config: str, log: BinaryIO, log_path: Path) -> None:
    """Fail when a kernel config fragment did not apply to ``config`` (the configured .config)."""
    b = req.recipe.recipe.build
    assert isinstance(b, KbuildBuild)
    frags = {f: (folder / f).read_text() for f in b.fragments}
    problems = buildsys.kbuild_fragment_problems(config, frags)
    if problems:
        log.write(("\n".join(problems) + "\n").encode())
        raise HadronError(
            f"{req.name}: kernel config fragments did not apply:\n  " + "\n  ".join(problems),
            hint=f"a symbol's dependencies are unmet; add them to the fragment (see the log: {log_path})",
        )


def snapshot_folder(req: BuildRequest, dest: Path) -> Path:
    """A copy of the recipe folder as the cache key saw it: the build reads the copy, so an edit made
    while it runs cannot end up in an output stored under the key of the folder before the edit."""
    folder = req.recipe.folder
    assert folder is not None
    shutil.copytree(folder, dest, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    if digest_folder(dest, dest / req.recipe.path.name) != req.recipe.files_digest:
        raise HadronError(
            f"{req.name}: the recipe folder {folder} changed after the build was planned",
            hint="run the build again: its key will be computed from the folder as it is now",
        )
    return dest


def build_in_cache(cache: Cache, req: BuildRequest,
                   run: Callable[[Path, BinaryIO, Path], dict[str, Any]]) -> Output:
    """The cache's side of one build, whichever executor runs it: under the key's lock, take what
    another hadron process committed meanwhile, else ``run(tmp, log, log_path)`` into a fresh
    temporary directory and commit its ``out`` with the log and the record ``run`` returns. The
    temporary directory goes in any case: nothing half-written stays in the cache."""
    with cache.lock(req.key):
        hit = cache.get(req.key)
        if hit is not None:
            return Output(hit.key, hit.path, reused=True)
        tmp = cache.new_tmp(req.key)
        log_path = cache.log_path(req.name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with log_path.open("wb") as log:
                record = run(tmp, log, log_path)
            shutil.copyfile(log_path, tmp / "out" / "build.log")
            return cache.commit(req.key, tmp / "out", record)
        finally:
            remove_tree(tmp)


class LocalExecutor:
    def __init__(self, cache: Cache, jobserver: JobServer, variation: sandbox.Variation = sandbox.STANDARD) -> None:
        self.cache = cache
        self.jobserver = jobserver
        self.variation = variation  # what the steps see of the machine; never part of a key

    def build(self, req: BuildRequest) -> Output:
        return build_in_cache(self.cache, req, lambda tmp, log, log_path: self._run(req, tmp, log, log_path))

    def _run(self, req: BuildRequest, tmp: Path, log: BinaryIO, log_path: Path) -> dict[str, Any]:
        r = req.recipe.recipe
        work = tmp / "work"
        dirs = {n: work / n for n in ("src", "build", "destdir", "sysroot")}
        for d in dirs.values():
            d.mkdir(parents=True)
        started = time.time()
        timings: dict[str, float] = {}

        def header(text: str) -> None:
            log.write(f"==> {text}\n".encode())
            log.flush()

        header(f"{r.name} {r.version} key {req.key}")
        t0 = time.monotonic()
        stage_sysroot(req.inputs, dirs["sysroot"])
        timings["stage"] = round(time.monotonic() - t0, 3)

        env = step_environment(req, self.variation)

        # Unpack: sources read-only at /sources, /src writable for this one step.
        if req.sources:
            mounts = [sandbox.Mount(dirs["src"], "/src", writable=True)]
            for i, (f, s) in enumerate(zip(req.sources, req.recipe.recipe.sources, strict=True)):
                mounts.append(sandbox.Mount(f.path, source_target(i, s.name)))
            self._step(req, "unpack", unpack_script(req), mounts, env, log, timings, jobserver=False, cwd="/src",
                       tmpfs=("/sources",))
            faults.point("after-unpack")

        mounts = [
            sandbox.Mount(dirs["src"], "/src"),
            sandbox.Mount(dirs["build"], "/build", writable=True),
            sandbox.Mount(dirs["destdir"], "/destdir", writable=True),
            sandbox.Mount(dirs["sysroot"], "/sysroot"),
        ]
        folder = snapshot_folder(req, tmp / "recipe") if req.recipe.folder is not None else None
        if folder is not None:
            mounts.append(sandbox.Mount(folder, "/recipe"))
        for phase in buildsys.phases(r, check=req.run_check):
            self._step(req, phase.name, phase.script, mounts, env, log, timings, jobserver=phase.uses_jobserver)
            if phase.name == "configure" and isinstance(r.build, KbuildBuild) and r.build.fragments:
                assert folder is not None
                check_kconfig(req, folder, (dirs["build"] / "_b" / ".config").read_text(), log,
                              self.cache.log_path(req.name))

        faults.point("after-build")
        t0 = time.monotonic()
        split_tree(dirs["destdir"], tmp / "out", r.dev_globs(), r.drop_globs())
        timings["split"] = round(time.monotonic() - t0, 3)
        faults.point("after-split")
        header(f"done in {time.time() - started:.1f}s")
        return build_record(req, started=started, timings=timings, log_path=log_path,
                            isolation="bwrap: user, mount, pid, ipc, uts, cgroup and network namespaces; "
                            "read-only root",
                            build_env="host /usr" if req.env_root is None else req.env_identity)

    def _step(
        self,
        req: BuildRequest,
        name: str,
        script: str,
        mounts: list[sandbox.Mount],
        env: dict[str, str],
        log: BinaryIO,
        timings: dict[str, float],
        *,
        jobserver: bool,
        cwd: str = "/build",
        tmpfs: tuple[str, ...] = (),
    ) -> None:
        req.on_phase(name)
        log.write(f"==> {name}\n".encode())
        log.flush()
        extra: list[bytes] = []
        step_env = dict(env)
        fds: tuple[int, ...] = ()
        if jobserver:
            step_env["MAKEFLAGS"] = self.jobserver.makeflags()
            step_env["JOBS"] = str(self.jobserver.jobs)
            fds = self.jobserver.fds
        else:
            extra = self.jobserver.grab(self.jobserver.jobs - 1)
            step_env["JOBS"] = str(1 + len(extra))
        t0 = time.monotonic()
        try:
            rc = sandbox.run(sandbox.Step(["/bin/sh", "-c", script], mounts, step_env, cwd=cwd, pass_fds=fds,
                                          root=req.env_root, tmpfs=tmpfs, variation=self.variation), log)
        finally:
            self.jobserver.release(extra)
        timings[name] = round(time.monotonic() - t0, 3)
        log.write(f"==> {name}: exit {rc} after {timings[name]:.1f}s\n".encode())
        log.flush()
        if rc != 0:
            raise BuildError(
                f"{name} step failed (exit status {rc})",
                hint=f"see the log: {self.cache.log_path(req.name)}",
            )
