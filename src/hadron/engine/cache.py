"""Content-addressed cache of package outputs and images.

Where everything lives is :mod:`hadron.layout`'s; this module decides what goes in:

    outputs/<key>/            one finished package build, renamed into place atomically
        runtime/  dev/        the split install tree
        manifest.json         files (output, path, type, mode, size, sha256/target), record, timings
        digest                sha256 over the manifest's file list: the output's content identity
        build.log
    images/<key>/             one finished image, renamed into place atomically, never replaced
        rootfs/ oci/ docker-archive.tar image.json
        manifest.json         every other file of the directory (path, type, mode, size, sha256/target)

A key hashes everything that can change an output (see :func:`compute_key`). Dependents hash the
*content digest* of their inputs, not their keys, so a rebuilt but byte-identical output does not
rebuild its dependents (early cutoff). Builds of one key are serialised by the key's lock and run in
a private ``tmp/`` directory; ``cache verify`` re-hashes outputs and images against their manifests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from hadron import BUILD_LOGIC_VERSION
from hadron.engine import faults
from hadron.errors import HadronError
from hadron.layout import CacheLayout, hold, try_lock
from hadron.layout import remove_tree as remove_tree
from hadron.layout import tree_size as tree_size

if TYPE_CHECKING:
    from hadron.engine.fetch import SourceStore

OUTPUTS = ("runtime", "dev")
MANIFEST = "manifest.json"
IMAGE_RECORD = "image.json"  # written by assembly; its presence marks a complete image directory


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


def canonical_mode(st_mode: int) -> int:
    """The permission bits an output keeps: group and other write permission are cleared, except on
    sticky directories (world-writable by design, like /var/tmp), so the umask a build ran with
    cannot reach an output."""
    mode = stat.S_IMODE(st_mode)
    if stat.S_ISDIR(st_mode) and mode & stat.S_ISVTX:
        return mode
    return mode & ~0o022


def split_tree(destdir: Path, out_root: Path, dev_globs: list[str], drop_globs: list[str]) -> None:
    """Move an install tree into ``out_root/runtime`` and ``out_root/dev``; dropped paths vanish.

    A directory goes to the output its path matches (``usr/include/`` matches ``usr/include/**``);
    directories left empty by the split are pruned, empty directories the package installed kept.
    Permission bits are made canonical (:func:`canonical_mode`).
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
            if not dst.is_symlink():
                dst.chmod(canonical_mode(dst.stat().st_mode))
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
            target.chmod(canonical_mode(p.stat().st_mode))
        dirnames[:] = keep
    for o in OUTPUTS:
        root = out_root / o
        for dirpath, _dirs, _files in os.walk(root, topdown=False):
            p = Path(dirpath)
            if p != root and p.relative_to(root).as_posix() not in installed_empty:
                with contextlib.suppress(OSError):
                    p.rmdir()  # fails (and is kept) when not empty


def scan_tree(root: Path, *, skip: Collection[str] = ()) -> list[dict[str, Any]]:
    """Manifest entries for every path under ``root`` (path relative to it, type, mode; size and
    sha256 of files; target of symlinks), sorted by path. Top-level names in ``skip`` are left out
    (a manifest does not list itself)."""
    entries: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if base == root:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            entries.append(_entry(base / name, root))
    entries.sort(key=lambda e: str(e["path"]))
    return entries


def _entry(p: Path, root: Path) -> dict[str, Any]:
    st = p.lstat()
    e: dict[str, Any] = {"path": p.relative_to(root).as_posix(), "mode": stat.S_IMODE(st.st_mode)}
    if stat.S_ISLNK(st.st_mode):
        e.update(type="symlink", target=os.readlink(p))
    elif stat.S_ISDIR(st.st_mode):
        e.update(type="dir")
    elif stat.S_ISREG(st.st_mode):
        e.update(type="file", size=st.st_size, sha256=_hash_file(p))
    else:
        raise HadronError(f"{p}: a device node, fifo or socket; cached trees hold only files, directories "
                          "and symlinks", hint="remove it in the recipe's install step (or the image's files/)")
    return e


def scan_outputs(out_root: Path) -> list[dict[str, Any]]:
    """Manifest entries of a package output: :func:`scan_tree` of runtime/ and dev/, each entry
    naming its ``output``, sorted by (output, path)."""
    entries = [{"output": o, **e} for o in OUTPUTS if (out_root / o).is_dir() for e in scan_tree(out_root / o)]
    entries.sort(key=lambda e: (e["output"], e["path"]))
    return entries


def diff_manifest(root: Path, want: list[dict[str, Any]], have: list[dict[str, Any]]) -> list[str]:
    """What differs between the entries a manifest lists (``want``) and those found under ``root``
    (``have``): ``<path>: missing``, ``not in the manifest``, ``content changed`` or ``metadata changed``."""
    w = {_location(e): e for e in want}
    h = {_location(e): e for e in have}
    problems: list[str] = []
    for loc in sorted(w.keys() | h.keys()):
        we, he = w.get(loc), h.get(loc)
        where = root / loc
        if he is None:
            problems.append(f"{where}: missing")
        elif we is None:
            problems.append(f"{where}: not in the manifest")
        elif we != he:
            what = "content changed" if we.get("sha256") != he.get("sha256") else "metadata changed"
            problems.append(f"{where}: {what}")
    return problems


def _location(e: dict[str, Any]) -> str:
    """An entry's path relative to the directory its manifest describes."""
    return f"{e['output']}/{e['path']}" if "output" in e else str(e["path"])


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
        data: dict[str, Any] = json.loads((self.path / MANIFEST).read_text())
        return data


@dataclass(frozen=True)
class GcResult:
    count: int  # entries removed: outputs, images, leftovers of killed builds and commands
    freed: int  # bytes


class VerifyReport(TypedDict):
    sources: int  # how many were checked
    outputs: int
    images: int
    problems: list[str]  # "<path>: <what is wrong>"


class Cache:
    """Package outputs and images under one cache root, and the locks that serialise their builds."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout

    @property
    def root(self) -> Path:
        return self.layout.root

    def ensure(self) -> None:
        for d in (self.layout.outputs, self.layout.tmp, self.layout.locks, self.layout.logs):
            d.mkdir(parents=True, exist_ok=True)

    def log_path(self, package: str) -> Path:
        return self.layout.log(package)

    # Package outputs.

    def get(self, key: str) -> Output | None:
        p = self.layout.output(key)
        if (p / "digest").is_file():
            return Output(key, p)
        return None

    def lock(self, key: str) -> AbstractContextManager[None]:
        """Exclusive lock on building package key ``key``, shared between processes."""
        return hold(self.layout.build_lock(key))

    def new_tmp(self, key: str) -> Path:
        """A fresh private directory for building ``key`` (call with the key's lock held).
        Directories left by killed builds of the same key are removed first."""
        self.ensure()
        for stale in self.layout.build_tmps(key):
            remove_tree(stale)
        p = self.layout.new_build_tmp(key)
        p.mkdir()
        return p

    def commit(self, key: str, staged: Path, record: dict[str, Any]) -> Output:
        """Write the manifest of a staged output and rename it into the cache atomically."""
        entries = scan_outputs(staged)
        digest = content_digest(entries)
        manifest = {**record, "key": key, "digest": digest, "files": entries}
        _write_synced(staged / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _write_synced(staged / "digest", digest + "\n")
        _fsync_dir(staged)
        faults.point("after-manifest")
        final = self.layout.output(key)
        try:
            os.rename(staged, final)
        except OSError:
            if self.get(key) is None:
                raise
            remove_tree(staged)  # another process finished the same key first
        _fsync_dir(self.layout.outputs)
        faults.point("after-rename")
        return Output(key, final)

    def adopt(self, key: str, staged: Path) -> Output:
        """Rename a verified output made elsewhere (``staged/out`` with its own manifest and log)
        into the cache whole; call with the key's tmp directory ``staged``."""
        out = staged / "out"
        manifest = json.loads((out / MANIFEST).read_text())
        _write_synced(out / "digest", str(manifest["digest"]) + "\n")
        _fsync_dir(out)
        final = self.layout.output(key)
        try:
            os.rename(out, final)
        except OSError:
            if self.get(key) is None:
                raise
        _fsync_dir(self.layout.outputs)
        return Output(key, final, reused=True)

    def all_outputs(self) -> list[Output]:
        return [out for key in self.layout.output_keys() if (out := self.get(key)) is not None]

    def verify(self, output: Output) -> list[str]:
        """Re-hash one output against its manifest; return the problems found."""
        try:
            manifest = output.manifest()
            files: list[dict[str, Any]] = manifest["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"{output.path}: unreadable manifest: {e}"]
        try:
            problems = diff_manifest(output.path, files, scan_outputs(output.path))
        except HadronError as e:
            return [e.message]
        if content_digest(files) != output.digest():
            problems.append(f"{output.path}/digest: does not match the manifest")
        return problems

    # Images.

    def image(self, key: str) -> Path | None:
        """The published image directory of ``key``, or None. Reads nothing but one stat: a cache
        hit must cost nothing."""
        p = self.layout.image(key)
        return p if (p / IMAGE_RECORD).is_file() else None

    def image_lock(self, key: str) -> AbstractContextManager[None]:
        """Exclusive lock on assembling and publishing image key ``key``, shared between processes."""
        return hold(self.layout.image_lock(key))

    @contextlib.contextmanager
    def image_staging(self, key: str) -> Iterator[Path]:
        """A fresh private directory to assemble image ``key`` in (hold the image lock), removed when
        the block ends unless it was published. Leftovers of killed assemblies of ``key`` go first."""
        self.ensure()
        for stale in self.layout.image_tmps(key):
            remove_tree(stale)
        p = self.layout.new_image_tmp(key)
        p.mkdir()
        try:
            yield p
        finally:
            remove_tree(p)  # already gone once published

    def publish_image(self, key: str, staged: Path) -> tuple[Path, bool]:
        """Write the manifest of the assembled image in ``staged`` and rename it to images/<key>
        (hold the image lock). A published image directory is never deleted or replaced, since a
        process may be reading it: when one exists already, ``staged`` is discarded. Returns the
        image directory and whether ``staged`` became it."""
        final = self.layout.image(key)
        if self.image(key) is None:
            entries = scan_tree(staged, skip=(MANIFEST,))
            manifest = {"key": key, "digest": content_digest(entries), "files": entries}
            _write_synced(staged / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            _fsync_dir(staged)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staged, final)  # refused when final exists, unless it is an empty directory
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
            else:
                _fsync_dir(final.parent)
                return final, True
        remove_tree(staged)
        if self.image(key) is None:
            raise HadronError(f"{final}: exists but is not a complete image (it has no {IMAGE_RECORD})",
                              hint=f"delete {final}; the next build assembles the image again")
        return final, False

    def all_images(self) -> list[Path]:
        """Every directory in images/ named by a key, complete or not (verify reports what is wrong)."""
        return [self.layout.image(key) for key in self.layout.image_keys()]

    def verify_image(self, path: Path) -> list[str]:
        """Re-hash one image directory against its manifest; return the problems found."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files: list[dict[str, Any]] = manifest["files"]
        except FileNotFoundError:
            return [f"{path / MANIFEST}: missing (the image was made by an older Hadron, or the file was deleted)"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"{path}: unreadable manifest: {e}"]
        try:
            problems = diff_manifest(path, files, scan_tree(path, skip=(MANIFEST,)))
        except HadronError as e:
            return [e.message]
        if content_digest(files) != manifest.get("digest"):
            problems.append(f"{path / MANIFEST}: its digest does not match its file list")
        return problems

    def verify_images(self) -> list[str]:
        """Re-hash every image directory; return the problems found."""
        return [p for path in self.all_images() for p in self.verify_image(path)]

    def verify_all(self, store: SourceStore) -> VerifyReport:
        """Re-hash every source in ``store``, every output and every image (what ``cache verify`` does)."""
        sources = store.digests()
        problems = [f"{store.path(d)}: content does not match its sha256 name" for d in store.verify()]
        outputs = self.all_outputs()
        for out in outputs:
            problems += self.verify(out)
        images = self.all_images()
        for path in images:
            problems += self.verify_image(path)
        return VerifyReport(sources=len(sources), outputs=len(outputs), images=len(images), problems=problems)

    # Garbage collection.

    def gc(self, keep_outputs: set[str], keep_images: set[str]) -> GcResult:
        """Remove the outputs and images whose keys are not kept, leftovers of killed builds in tmp/
        and work directories of commands that are gone. Nothing whose lock is held is touched: not
        the output or image of a key being built, nor a running build's or command's directory."""
        sizes: list[int | None] = []
        for key in self.layout.output_keys():
            if key not in keep_outputs:
                sizes.append(self._discard(self.layout.output(key), self.layout.build_lock(key),
                                           self.layout.new_build_tmp(key)))
        for key in self.layout.image_keys():
            if key not in keep_images:
                sizes.append(self._discard(self.layout.image(key), self.layout.image_lock(key),
                                           self.layout.new_image_tmp(key)))
        sizes += self._reap_tmp()
        removed = [n for n in sizes if n is not None]
        work_count, work_freed = self.layout.reap_work_dirs()
        return GcResult(len(removed) + work_count, sum(removed) + work_freed)

    def _discard(self, final: Path, lock: Path, grave: Path) -> int | None:
        """Remove published directory ``final`` unless ``lock`` is held; returns the bytes freed, or
        None if it was left. It is first renamed to ``grave`` in tmp/, so no process ever finds it
        half removed (a killed gc leaves a tmp/ entry the next gc removes)."""
        with try_lock(lock) as free:
            if not free or not final.exists():  # being built, or removed by another gc meanwhile
                return None
            size = tree_size(final)
            grave.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, grave)
            remove_tree(grave)
            return size

    def _reap_tmp(self) -> list[int | None]:
        """Remove tmp/ entries of builds whose owner is gone (their key's lock is free); returns the
        bytes freed by each. Entries with names this cache does not make are left alone."""
        tmp = self.layout.tmp
        sizes: list[int | None] = []
        for entry in sorted(tmp.iterdir()) if tmp.is_dir() else []:
            lock = self.layout.tmp_owner(entry)
            if lock is None:
                continue
            with try_lock(lock) as free:
                if free and os.path.lexists(entry):
                    sizes.append(tree_size(entry))
                    remove_tree(entry)
        return sizes


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
