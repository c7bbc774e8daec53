"""The no-op memo: answer a build whose inputs are all unchanged without loading a recipe.

After a successful ``hadron build``, a record is written (``plans/<checksum>.json`` in the cache)
holding the request, the result, and everything the result was derived from, each with its stamp
(size, mtime, inode, ctime; absent files too): hadron.toml and $HADRON_CONFIG, the recipe
directories and every file in them, the image definitions and their ``files/`` trees, the toolchain
profiles, Hadron's own code and host table, the host's os-release, the source files chosen in the
store and the ones that would have been preferred, the cached outputs and images the result names,
the ``out/`` links, and every host program the builds may run (looked up on the build PATH again
and stamped by the file it resolves to). A request whose record still matches in every stamp has
the same keys, so the same result; anything else (an edited recipe or configuration, a changed
source digest, a changed host tool or toolchain profile, an output removed by gc) falls through to
the full build, which writes a new record.

Stamps, not contents: an edit that keeps size, mtime and ctime of a file is not seen, as in make or
ninja; ctime cannot be set back by a user. This module imports only light parts of the standard
library (no hashlib, shutil or tomllib): it is the whole of a no-op's work.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hadron import config

VERSION = 1
CODE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Request:
    """What decides a build's result; ``jobs``, ``offline``, ``keep_going`` and ``check`` do not."""

    project: Path
    cache_dir: Path
    targets: tuple[str, ...]
    recipes: tuple[Path, ...]
    toolchain: str | None

    @classmethod
    def make(cls, targets: Iterable[str], recipes: Iterable[Path], toolchain: str | None,
             cache_dir: Path | None) -> Request:
        project = config.find_project()
        return cls(project, config.cache_root(project, cache_dir), tuple(targets),
                   tuple(p.resolve() for p in recipes), toolchain)

    def identity(self) -> str:
        """The request as text; the configuration files' contents are stamps in the record."""
        return json.dumps({
            "v": VERSION,
            "project": str(self.project),
            "cache": str(self.cache_dir),
            "targets": list(self.targets),
            "recipes": [str(p) for p in self.recipes],
            "toolchain": self.toolchain,
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HADRON_")},
        }, sort_keys=True)

    def record_path(self) -> Path:
        """Where the record lives: named by a checksum of the identity, which the record holds in
        full (two requests sharing a name only overwrite each other's record)."""
        from hadron.layout import CacheLayout

        return CacheLayout(self.cache_dir).plan(f"{zlib.crc32(self.identity().encode()):08x}")


def stamp(path: str) -> str | None:
    """The file's (not the link target's) size, mtime, inode and ctime; None if it does not exist."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def tool_stamp(name: str, path: str) -> str | None:
    """Where a host program resolves on the build PATH, and the stamp of the file it is."""
    found = which(name, path)
    if found is None:
        return None
    real = os.path.realpath(found)
    return f"{found}>{real}@{stamp(real)}"


def which(name: str, path: str) -> str | None:
    """The first executable ``name`` on ``path`` (what shutil.which finds, without importing shutil)."""
    for d in path.split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK) and not os.path.isdir(p):
            return p
    return None


def answer(req: Request) -> dict[str, Any] | None:
    """The recorded result of ``req`` if every stamp still matches, else None."""
    try:
        rec = json.loads(req.record_path().read_text())
    except (OSError, ValueError):
        return None
    if rec.get("v") != VERSION or rec.get("request") != req.identity():
        return None
    for path, st in rec["watch"]:
        if stamp(path) != st:
            return None
    search = rec["path"]
    for name, st in rec["tools"]:
        if tool_stamp(name, search) != st:
            return None
    result: dict[str, Any] = rec["result"]
    return result


class Watch:
    """Collects what a result depends on, for :func:`remember`."""

    def __init__(self, search_path: str) -> None:
        self.search_path = search_path
        self.paths: dict[str, str | None] = {}
        self.tools: set[str] = set()

    def file(self, path: Path | str) -> None:
        p = str(path)
        self.paths[p] = stamp(p)

    def tree(self, root: Path) -> None:
        """A directory and everything below it (a new or removed entry changes its directory)."""
        self.file(root)
        if not root.is_dir() or root.is_symlink():
            return
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for n in dirnames + filenames:
                self.file(os.path.join(dirpath, n))

    def code(self) -> None:
        """Hadron's own code and host table: a changed build-system helper changes keys. Files only:
        a new module changes nothing until an existing one imports it, and the directories change
        whenever Python writes a ``__pycache__``."""
        for dirpath, dirnames, filenames in os.walk(CODE_DIR):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for n in filenames:
                if n.endswith((".py", ".tsv")):
                    self.file(os.path.join(dirpath, n))


def remember(req: Request, watch: Watch, result: dict[str, Any]) -> None:
    """Write the record for ``req`` atomically (a no-op never reads a half-written one)."""
    rec = {
        "v": VERSION,
        "request": req.identity(),
        "watch": sorted(watch.paths.items()),
        "path": watch.search_path,
        "tools": sorted((t, tool_stamp(t, watch.search_path)) for t in watch.tools),
        "result": result,
    }
    path = req.record_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(rec))
    os.replace(tmp, path)


def forget(req: Request) -> None:
    """Drop the record (a build that did not succeed must not be answered from an older one)."""
    with contextlib.suppress(FileNotFoundError):
        req.record_path().unlink()
