"""The cache directory's layout: the one module that names paths under the cache root.

Every other module asks a :class:`CacheLayout` for the path it needs and joins no names under the
root itself, so what lives where, and which lock guards what, is decided here::

    <root>/
    ├── sources/
    │   ├── sha256/<digest>            verified source files, named by their sha256
    │   ├── signatures/<digest>.json   upstream's signature of that file and who made it, written
    │   │                              once the signature verified against the recipe's pinned keys
    │   └── tmp/                       downloads in progress; never read
    ├── outputs/<key>/                 finished package builds, each renamed into place whole
    ├── images/<key>/                  finished images (rootfs/, oci/, docker-archive.tar, image.json,
    │                                  manifest.json), each renamed into place whole, never replaced
    ├── logs/<name>.log                latest log of a package build (or of a boot disk)
    ├── locks/
    │   ├── <key>.lock                 flock held while package key <key> is built
    │   └── image-<key>.lock           flock held while image key <key> is assembled and published
    ├── tmp/
    │   ├── <key>.<pid>.<n>/           a package build in progress, owned by locks/<key>.lock
    │   └── image-<key>.<pid>.<n>/     an image assembly in progress, owned by locks/image-<key>.lock
    ├── run/
    │   ├── <prefix>.<pid>.<n>/        work directory of one running command (a boot's disks, its
    │   │                              firmware variables), removed when the command ends
    │   └── <prefix>.<pid>.<n>.lock    its flock: taken before the directory exists, held while it runs
    ├── plans/<name>.json              no-op memo of one build request
    ├── buildenv/<digest>/             a build environment, named by its OCI manifest digest (hex):
    │                                  oci/ (the image), rootfs/ (its unpacked tree, the sandbox
    │                                  root), env.json; renamed into place whole, never changed
    └── envid.json                     memo of host tool digests (by path, size, mtime and inode)

Ownership is by flock, never by process id: a lock is free exactly when no live process holds it,
so a crashed command's leftovers are recognised without guessing. Garbage collection removes a
``tmp/`` or ``run/`` entry only while it holds that entry's lock itself, and leaves alone anything
whose lock is held or whose name this module does not make.

Standard library only: the command line imports this module on its fast (no-op) path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_KEY = re.compile(r"[0-9a-f]{64}")
# Names this module gives entries of tmp/: (image-)<key>.<pid>.<n>.
_TMP_ENTRY = re.compile(r"(?P<image>image-)?(?P<key>[0-9a-f]{64})\.[0-9]+\.[0-9]+")
_IMAGE_PREFIX = "image-"
_LOCK_SUFFIX = ".lock"


def _key(key: str) -> str:
    """``key`` if it is a cache key (64 lowercase hex digits): nothing else may name a cache entry."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a cache key (64 lowercase hex digits): {key!r}")
    return key


def _name(name: str) -> str:
    """``name`` if it can be one path component: never a way out of its directory."""
    if not name or name.startswith(".") or "/" in name or "\0" in name:
        raise ValueError(f"not a plain file name: {name!r}")
    return name


def _unique(stem: str) -> str:
    return f"{stem}.{os.getpid()}.{time.monotonic_ns()}"


@dataclass(frozen=True)
class CacheLayout:
    """Every path under one cache root (see the module docstring for the tree)."""

    root: Path

    # Sources.

    @property
    def sources(self) -> Path:
        return self.root / "sources"

    @property
    def source_objects(self) -> Path:
        """Directory of verified source files, each named by its sha256."""
        return self.sources / "sha256"

    def source(self, digest: str) -> Path:
        return self.source_objects / _name(digest)

    @property
    def source_signatures(self) -> Path:
        """Directory of verified upstream signatures, one record per signed source file."""
        return self.sources / "signatures"

    def source_signature(self, digest: str) -> Path:
        return self.source_signatures / f"{_name(digest)}.json"

    @property
    def sources_tmp(self) -> Path:
        """Downloads in progress: a file is moved to :meth:`source` only once its digest is verified."""
        return self.sources / "tmp"

    # Finished builds.

    @property
    def outputs(self) -> Path:
        return self.root / "outputs"

    def output(self, key: str) -> Path:
        return self.outputs / _key(key)

    @property
    def images(self) -> Path:
        return self.root / "images"

    def image(self, key: str) -> Path:
        return self.images / _key(key)

    def output_keys(self) -> list[str]:
        """Keys of the entries in outputs/, sorted (complete or not: the caller checks)."""
        return _keys_in(self.outputs)

    def image_keys(self) -> list[str]:
        """Keys of the entries in images/, sorted (complete or not: the caller checks)."""
        return _keys_in(self.images)

    # Logs, memos.

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        """The latest log of package ``name`` (or of another named step, e.g. ``<image>-grub-disk``)."""
        return self.logs / f"{_name(name)}.log"

    @property
    def buildenvs(self) -> Path:
        return self.root / "buildenv"

    def buildenv(self, digest_hex: str) -> Path:
        """A build environment by the hex of its OCI manifest digest."""
        return self.buildenvs / _key(digest_hex)

    @property
    def envid(self) -> Path:
        """Memo of host tool digests (hadron.host.EnvIdentity)."""
        return self.root / "envid.json"

    @property
    def plans(self) -> Path:
        return self.root / "plans"

    def plan(self, name: str) -> Path:
        """The no-op memo of build request ``name`` (hadron.noop)."""
        return self.plans / f"{_name(name)}.json"

    # Locks and builds in progress.

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def build_lock(self, key: str) -> Path:
        """Held while package key ``key`` is built (and owns its ``tmp/`` entries)."""
        return self.locks / f"{_key(key)}{_LOCK_SUFFIX}"

    def image_lock(self, key: str) -> Path:
        """Held while image key ``key`` is assembled and published (and owns its ``tmp/`` entries)."""
        return self.locks / f"{_IMAGE_PREFIX}{_key(key)}{_LOCK_SUFFIX}"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def new_build_tmp(self, key: str) -> Path:
        """A fresh name (not created) for a package build of ``key``; use it with the key's lock held."""
        return self.tmp / _unique(_key(key))

    def build_tmps(self, key: str) -> list[Path]:
        """Existing tmp/ entries of package builds of ``key``."""
        return sorted(self.tmp.glob(f"{_key(key)}.*"))

    def new_image_tmp(self, key: str) -> Path:
        """A fresh name (not created) for an assembly of image ``key``; use it with the image lock held."""
        return self.tmp / _unique(_IMAGE_PREFIX + _key(key))

    def image_tmps(self, key: str) -> list[Path]:
        """Existing tmp/ entries of assemblies of image ``key``."""
        return sorted(self.tmp.glob(f"{_IMAGE_PREFIX}{_key(key)}.*"))

    def tmp_owner(self, entry: Path) -> Path | None:
        """The lock that owns tmp/ entry ``entry``, or None when its name is not one this layout
        makes (then nobody may assume it is stale)."""
        m = _TMP_ENTRY.fullmatch(entry.name)
        if m is None or entry.parent != self.tmp:
            return None
        return self.image_lock(m["key"]) if m["image"] else self.build_lock(m["key"])

    # Work directories of running commands.

    @property
    def run(self) -> Path:
        return self.root / "run"

    @contextlib.contextmanager
    def work_dir(self, prefix: str) -> Iterator[Path]:
        """A fresh private directory ``run/<prefix>.<pid>.<n>/`` for one running command.

        Its lock file is created and locked before the directory exists and stays locked for as
        long as the block runs, so :meth:`reap_work_dirs` never takes a live command's directory.
        The directory is removed when the block ends, by an exception or KeyboardInterrupt too; if
        the process is killed, the next ``hadron cache gc`` removes it."""
        fd, lock = self._claim_work_lock(_name(prefix))
        path = lock.with_name(lock.name.removesuffix(_LOCK_SUFFIX))
        try:
            path.mkdir(mode=0o700)
            try:
                yield path
            finally:
                remove_tree(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            os.close(fd)

    def _claim_work_lock(self, prefix: str) -> tuple[int, Path]:
        """Create and lock a new work directory's lock file; returns its descriptor and path.

        gc may remove a lock file whose directory does not exist yet (it cannot tell a new one from
        a dead one): a lock whose path no longer names the file we locked is given up for another."""
        self.run.mkdir(parents=True, exist_ok=True)
        while True:
            lock = self.run / (_unique(prefix) + _LOCK_SUFFIX)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    return fd, lock
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)

    def reap_work_dirs(self) -> tuple[int, int]:
        """Remove the work directories whose command is gone (lock free or lock file missing), and
        lock files left without a directory. Returns (directories removed, bytes freed)."""
        if not self.run.is_dir():
            return 0, 0
        count = freed = 0
        for entry in sorted(self.run.iterdir()):
            if entry.name.endswith(_LOCK_SUFFIX):
                _reap_lone_lock(entry)
                continue
            lock = entry.with_name(entry.name + _LOCK_SUFFIX)
            with try_lock(lock, create=False) as free:
                if free and os.path.lexists(entry):  # not removed by another gc meanwhile
                    freed += tree_size(entry)
                    remove_tree(entry)
                    count += 1
                    with contextlib.suppress(FileNotFoundError):
                        lock.unlink()
        return count, freed


def _reap_lone_lock(lock: Path) -> None:
    """Unlink a work directory's lock file if its directory is gone and nobody holds it."""
    directory = lock.with_name(lock.name.removesuffix(_LOCK_SUFFIX))
    with try_lock(lock, create=False) as free:
        if free and not directory.exists():
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()


def _keys_in(directory: Path) -> list[str]:
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if _KEY.fullmatch(p.name))


@contextlib.contextmanager
def hold(lock: Path) -> Iterator[None]:
    """Wait for the exclusive flock on file ``lock`` (created if missing) and hold it for the block.

    Lock files of keys are never removed: a removed lock file could let two processes hold
    "the" lock on two different files."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def try_lock(lock: Path, *, create: bool = True) -> Iterator[bool]:
    """The exclusive flock on ``lock`` if it is free right now: the block gets True while holding it,
    else False (held by a live process). Never waits: for gc, which must not disturb a running
    command. With ``create`` False a missing lock file counts as free (its owner has gone)."""
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    if create:
        lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, flags, 0o644)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free = True
        except BlockingIOError:
            free = False
        yield free
    finally:
        os.close(fd)


def tree_size(path: Path) -> int:
    """Bytes in the regular files under ``path`` (what removing it frees, roughly)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).lstat().st_size
    return total


def remove_tree(path: Path) -> None:
    """Remove a file or tree, also where a build left read-only directories; a missing path is fine."""
    import shutil  # here, not at the top: a no-op build imports this module and removes nothing

    def onerror(func: Any, p: str, exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o755)
            os.chmod(p, 0o755)
        with contextlib.suppress(OSError):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=onerror)
