"""Sandbox: run one build step in fresh Linux namespaces, without any daemon.

Each step runs under bubblewrap in new user, mount, pid, ipc, uts and cgroup namespaces and an
empty network namespace (loopback only, down). The root is a tree mounted read-only: the build
environment (:mod:`hadron.engine.buildenv`), an image's own tree, or else the host's ``/usr`` and
``/etc``. The dependencies' outputs are mounted read-only; only the build directory, DESTDIR and a
private ``/tmp`` are writable, and the root of the sandbox is re-mounted read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import BinaryIO

from hadron.errors import SandboxError
from hadron.host import SANDBOX_PATH, install_hint

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("bwrap",)
HOSTNAME = "hadron-build"
# Top-level host directories that form the read-only build environment.
HOST_ENV_DIRS = ("usr", "etc", "opt")
HOST_ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    writable: bool = False


@dataclass(frozen=True)
class Variation:
    """What a build step sees of the machine that runs it, beyond its inputs: the standard values
    every build uses, or varied ones with which ``hadron verify-repro`` rebuilds to show an output
    does not depend on them. None of it is part of a cache key."""

    hostname: str = HOSTNAME
    uid: int = 0  # user and group inside the user namespace
    umask: int = 0o022
    env: Mapping[str, str] = field(default_factory=dict)  # the machine's TZ, LC_ALL, LANG (recipes may set their own)

    def describe(self) -> dict[str, str]:
        return {"hostname": self.hostname, "uid": str(self.uid), "umask": f"{self.umask:04o}",
                **dict(sorted(self.env.items()))}


STANDARD = Variation()


@dataclass(frozen=True)
class Step:
    """One command to run in a sandbox."""

    argv: Sequence[str]
    mounts: Sequence[Mount]
    env: Mapping[str, str]
    cwd: str = "/build"
    pass_fds: Sequence[int] = field(default_factory=tuple)
    # A tree used as the sandbox's root (read-only) instead of the build environment: runs an
    # image's own programs, e.g. dracut and GRUB's tools when a disk is written.
    root: Path | None = None
    # Directories that get an empty tmpfs (mount points for per-file mounts below them).
    tmpfs: Sequence[str] = ()
    variation: Variation = STANDARD


def base_env(source_date_epoch: int, home: str = "/build/.home") -> dict[str, str]:
    return {
        "PATH": SANDBOX_PATH,
        "LC_ALL": "C",
        "LANG": "C",
        "TZ": "UTC",
        "SOURCE_DATE_EPOCH": str(source_date_epoch),
        "HOME": home,
        "TMPDIR": "/tmp",
        "SHELL": "/bin/sh",
        "TERM": "dumb",
    }


@cache
def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _root_args() -> list[str]:
    args: list[str] = []
    for d in HOST_ENV_DIRS:
        if Path("/" + d).is_dir():
            args += ["--ro-bind", "/" + d, "/" + d]
    for d in HOST_ROOT_LINKS:
        p = Path("/" + d)
        if p.is_symlink():
            args += ["--symlink", os.readlink(p), "/" + d]
        elif p.is_dir():
            args += ["--ro-bind", str(p), "/" + d]
    return args


def bwrap_argv(step: Step) -> list[str]:
    bwrap = bwrap_path()
    if bwrap is None:
        raise SandboxError(
            "bubblewrap (bwrap) is not installed; Hadron runs every build step in a bwrap sandbox",
            hint=install_hint(["bwrap"]),
        )
    args = [
        bwrap,
        "--unshare-user",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        step.variation.hostname,
        "--die-with-parent",
        "--new-session",
        "--uid",
        str(step.variation.uid),
        "--gid",
        str(step.variation.uid),
        *(["--ro-bind", str(step.root), "/"] if step.root is not None else _root_args()),
        "--proc",
        "/proc",
        "--ro-bind",
        "/proc/sys",
        "/proc/sys",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
    ]
    # A read-only image root may lack /var/tmp (systemd-tmpfiles makes it at boot): no mount point.
    if step.root is None or (step.root / "var/tmp").is_dir():
        args += ["--tmpfs", "/var/tmp"]
    for d in step.tmpfs:
        args += ["--tmpfs", d]
    for m in step.mounts:
        args += ["--bind" if m.writable else "--ro-bind", str(m.source), m.target]
    args += ["--remount-ro", "/", "--chdir", step.cwd, "--clearenv"]
    for k, v in sorted(step.env.items()):
        args += ["--setenv", k, v]
    return [*args, "--", *step.argv]


def run(step: Step, log: BinaryIO | int | None = None) -> int:
    """Run a step; its stdout and stderr go to ``log``. Returns the exit status."""
    argv = bwrap_argv(step)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT if log is not None else None,
        pass_fds=tuple(step.pass_fds),
        umask=step.variation.umask,
        env={"PATH": SANDBOX_PATH},
        start_new_session=False,
    )
    try:
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise


@cache
def check_isolation() -> None:
    """Refuse to build when this host cannot create the namespaces a sandbox needs."""
    step = Step(argv=["/bin/sh", "-c", "test -d /proc/self && echo ok"], mounts=(), env=base_env(0), cwd="/")
    try:
        res = subprocess.run(bwrap_argv(step), capture_output=True, timeout=60, env={"PATH": SANDBOX_PATH})
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SandboxError(f"cannot start the build sandbox: {e}") from None
    if res.returncode != 0 or b"ok" not in res.stdout:
        detail = (res.stderr or res.stdout).decode(errors="replace").strip()
        raise SandboxError(
            f"this host cannot isolate build steps (bwrap failed: {detail})",
            hint="enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
            "or user.max_user_namespaces > 0) or run as root; Hadron does not build unisolated",
        )
