"""Content-addressed output cache.

Layout under the cache root::

    outputs/<key>/            one finished build, renamed into place atomically
        runtime/  dev/        the split install tree
        manifest.json         files (output, path, type, mode, size, sha256/target), record, timings
        digest                sha256 over the manifest's file list: the output's content identity
        build.log
    logs/<package>.log        log of the latest attempt (also kept for failures)
    tmp/<key>.<pid>.<n>/      builds in progress; never read, removed when stale
    locks/<key>.lock          flock held while a key is being built

A key hashes everything that can change an output (see :func:`compute_key`). Dependents hash the
*content digest* of their inputs, not their keys, so a rebuilt but byte-identical output does not
rebuild its dependents (early cutoff).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hadron import BUILD_LOGIC_VERSION
from hadron.engine import faults
from hadron.errors import HadronError

OUTPUTS = ("runtime", "dev")


def compute_key(
    *,
    recipe_digest: str,
    steps_digest: str,
    source_digests: list[str],
    input_digests: dict[str, str],
    env_identity: str,
    toolchain: str,
    arch: str,
) -> str:
    doc = {
        "logic": BUILD_LOGIC_VERSION,
        "recipe": recipe_digest,
        "steps": steps_digest,
        "sources": source_digests,
        "inputs": dict(sorted(input_digests.items())),
        "env": env_identity,
        "toolchain": toolchain,
        "arch": arch,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``**`` spans directories, ``*`` and ``?`` do not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def _matches(rel: str, pats: list[re.Pattern[str]]) -> bool:
    return any(p.match(rel) for p in pats)


def split_tree(destdir: Path, out_root: Path, dev_globs: list[str], drop_globs: list[str]) -> None:
    """Move an install tree into ``out_root/runtime`` and ``out_root/dev``; dropped paths vanish.

    A directory goes to the output its path matches (``usr/include/`` matches ``usr/include/**``);
    directories left empty by the split are pruned, empty directories the package installed kept.
    """
    dev = [glob_to_regex(g) for g in dev_globs]
    drop = [glob_to_regex(g) for g in drop_globs]
    for o in OUTPUTS:
        (out_root / o).mkdir(parents=True, exist_ok=True)
    installed_empty: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(destdir, topdown=True):
        base = Path(dirpath)
        links = [d for d in dirnames if (base / d).is_symlink()]
        for name in sorted(filenames + links):
            src = base / name
            rel = src.relative_to(destdir).as_posix()
            if _matches(rel, drop):
                continue
            dst = out_root / ("dev" if _matches(rel, dev) else "runtime") / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        keep = []
        for d in sorted(set(dirnames) - set(links)):
            p = base / d
            rel = p.relative_to(destdir).as_posix()
            if _matches(rel + "/", drop):
                continue
            keep.append(d)
            if not any(p.iterdir()):
                installed_empty.add(rel)
            target = out_root / ("dev" if _matches(rel + "/", dev) else "runtime") / rel
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(stat.S_IMODE(p.stat().st_mode))
        dirnames[:] = keep
    for o in OUTPUTS:
        root = out_root / o
        for dirpath, _dirs, _files in os.walk(root, topdown=False):
            p = Path(dirpath)
            if p != root and p.relative_to(root).as_posix() not in installed_empty:
                with contextlib.suppress(OSError):
                    p.rmdir()  # fails (and is kept) when not empty


def scan_tree(out_root: Path) -> list[dict[str, Any]]:
    """Manifest entries for every path in the outputs, sorted."""
    entries: list[dict[str, Any]] = []
    for o in OUTPUTS:
        root = out_root / o
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath)
            for name in dirnames + filenames:
                p = base / name
                rel = p.relative_to(root).as_posix()
                st = p.lstat()
                e: dict[str, Any] = {"output": o, "path": rel, "mode": stat.S_IMODE(st.st_mode)}
                if stat.S_ISLNK(st.st_mode):
                    e.update(type="symlink", target=os.readlink(p))
                elif stat.S_ISDIR(st.st_mode):
                    e.update(type="dir")
                elif stat.S_ISREG(st.st_mode):
                    e.update(type="file", size=st.st_size, sha256=_hash_file(p))
                else:
                    raise HadronError(f"{p}: unsupported file type in build output (device, fifo or socket)")
                entries.append(e)
    entries.sort(key=lambda e: (e["output"], e["path"]))
    return entries


def _hash_file(p: Path) -> str:
    h = hashlib.sha256()
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def content_digest(entries: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(e, sort_keys=True).encode() + b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class Output:
    key: str
    path: Path
    reused: bool = field(default=False, compare=False)  # found in the cache, not built by this process

    @property
    def runtime(self) -> Path:
        return self.path / "runtime"

    @property
    def dev(self) -> Path:
        return self.path / "dev"

    @property
    def log(self) -> Path:
        return self.path / "build.log"

    def digest(self) -> str:
        return (self.path / "digest").read_text().strip()

    def manifest(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "manifest.json").read_text())
        return data


class Cache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.outputs = root / "outputs"
        self.tmp = root / "tmp"
        self.locks = root / "locks"
        self.logs = root / "logs"
        self.work = root / "work"

    def ensure(self) -> None:
        for d in (self.outputs, self.tmp, self.locks, self.logs, self.work):
            d.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Output | None:
        p = self.outputs / key
        if (p / "digest").is_file():
            return Output(key, p)
        return None

    def log_path(self, package: str) -> Path:
        return self.logs / f"{package}.log"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock on building one key, shared between processes."""
        self.ensure()
        fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def new_tmp(self, key: str) -> Path:
        """A fresh private directory for building ``key`` (call with the key's lock held).
        Directories left by killed builds of the same key are removed first."""
        self.ensure()
        for stale in self.tmp.glob(f"{key}.*"):
            remove_tree(stale)
        for stale in self.work.glob(f"{key}.*"):
            remove_tree(stale)
        p = self.tmp / f"{key}.{os.getpid()}.{time.monotonic_ns()}"
        p.mkdir()
        return p

    def new_work(self, key: str) -> Path:
        p = self.work / f"{key}.{os.getpid()}.{time.monotonic_ns()}"
        p.mkdir(parents=True)
        return p

    def commit(self, key: str, staged: Path, record: dict[str, Any]) -> Output:
        """Write the manifest of a staged output and rename it into the cache atomically."""
        entries = scan_tree(staged)
        digest = content_digest(entries)
        manifest = {**record, "key": key, "digest": digest, "files": entries}
        _write_synced(staged / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _write_synced(staged / "digest", digest + "\n")
        _fsync_dir(staged)
        faults.point("after-manifest")
        final = self.outputs / key
        try:
            os.rename(staged, final)
        except OSError:
            if self.get(key) is None:
                raise
            remove_tree(staged)  # another process finished the same key first
        _fsync_dir(self.outputs)
        faults.point("after-rename")
        return Output(key, final)

    def all_outputs(self) -> list[Output]:
        if not self.outputs.is_dir():
            return []
        return [Output(p.name, p) for p in sorted(self.outputs.iterdir()) if (p / "digest").is_file()]

    def verify(self, output: Output) -> list[str]:
        """Re-hash one output against its manifest; return the problems found."""
        problems: list[str] = []
        try:
            manifest = output.manifest()
        except (OSError, ValueError) as e:
            return [f"{output.path}: unreadable manifest: {e}"]
        want = {(e["output"], e["path"]): e for e in manifest["files"]}
        try:
            have = {(e["output"], e["path"]): e for e in scan_tree(output.path)}
        except HadronError as e:
            return [str(e)]
        for k in sorted(want.keys() | have.keys()):
            w, h = want.get(k), have.get(k)
            where = f"{output.path / k[0] / k[1]}"
            if h is None:
                problems.append(f"{where}: missing")
            elif w is None:
                problems.append(f"{where}: not in the manifest")
            elif w != h:
                what = "content changed" if w.get("sha256") != h.get("sha256") else "metadata changed"
                problems.append(f"{where}: {what}")
        if content_digest(manifest["files"]) != output.digest():
            problems.append(f"{output.path}/digest: does not match the manifest")
        return problems

    def gc(self, keep: set[str]) -> tuple[int, int]:
        """Remove outputs not in ``keep`` and stale temporary directories. Returns (count, bytes)."""
        count = 0
        freed = 0
        for out in self.all_outputs():
            if out.key not in keep:
                freed += tree_size(out.path)
                remove_tree(out.path)
                count += 1
        for d in (self.tmp, self.work):
            if not d.is_dir():
                continue
            for p in d.iterdir():
                key = p.name.split(".", 1)[0]
                fd = os.open(self.locks / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a build in progress
                    freed += tree_size(p)
                    remove_tree(p)
                    count += 1
                finally:
                    os.close(fd)
        return count, freed


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / f).lstat().st_size
    return total


def remove_tree(path: Path) -> None:
    """Remove a tree even where a build left read-only directories."""

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
