"""Sources: a content-addressed store keyed by sha256, fed from upstream and configured mirrors.

A download goes to a temporary file next to the store, is hashed while it streams, and is moved
into place with an atomic rename only when its digest is one the recipe pins. Nothing unverified is
ever visible under ``sources/sha256/`` (see :mod:`hadron.layout`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hadron.engine.mirrors import Candidate, MirrorProvider
from hadron.engine.recipe import LoadedRecipe, Source
from hadron.errors import FetchError
from hadron.layout import CacheLayout

CHUNK = 1 << 20
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Fetched:
    source: Source
    digest: str
    path: Path
    origin: str  # "store" or the URL it came from


class SourceStore:
    """Verified source files under a cache root, named by their sha256 (paths: :class:`CacheLayout`)."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout
        self.objects = layout.source_objects
        self.tmp = layout.sources_tmp

    def path(self, digest: str) -> Path:
        return self.layout.source(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def _ensure(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def download(self, url: str, expected: str, timeout: float = 60.0, progress: Progress | None = None) -> Path:
        """Download ``url`` and store it if its sha256 is ``expected``; raise FetchError otherwise."""
        self._ensure()
        fd, tmpname = tempfile.mkstemp(prefix="dl-", dir=self.tmp)
        tmp = Path(tmpname)
        try:
            h = hashlib.sha256()
            got = 0
            req = urllib.request.Request(url, headers={"User-Agent": "hadron-fetch/1"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(req, timeout=timeout) as resp:
                length_hdr = resp.headers.get("Content-Length")
                length = int(length_hdr) if length_hdr and length_hdr.isdigit() else None
                while chunk := resp.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    if progress:
                        progress(got, length)
                out.flush()
                os.fsync(out.fileno())
            if length is not None and got != length:
                raise FetchError(
                    f"{url}: truncated download: got {got} of {length} bytes",
                    hint="retry; if it persists the server or mirror is broken",
                )
            actual = h.hexdigest()
            if actual != expected:
                raise FetchError(
                    f"{url}: sha256 mismatch\n    expected {expected}\n    actual   {actual}",
                    hint="the file differs from the one the recipe pins; it was discarded. If upstream "
                    "re-released it, verify the new file and update the recipe's sha256",
                )
            os.replace(tmp, self.path(expected))
            return self.path(expected)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise FetchError(f"{url}: {reason}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def add_file(self, path: Path, expected: str) -> Path:
        """Import a local file (verified) into the store."""
        self._ensure()
        h = hashlib.sha256()
        fd, tmpname = tempfile.mkstemp(prefix="add-", dir=self.tmp)
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != expected:
                raise FetchError(f"{path}: sha256 mismatch\n    expected {expected}\n    actual   {h.hexdigest()}")
            os.replace(tmpname, self.path(expected))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmpname)
        return self.path(expected)

    def digests(self) -> list[str]:
        """The names of every stored source, sorted."""
        return sorted(p.name for p in self.objects.iterdir()) if self.objects.is_dir() else []

    def verify(self) -> list[str]:
        """Re-hash every stored source; return the digests whose content is wrong."""
        return [d for d in self.digests() if file_sha256(self.path(d)) != d]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def candidates(source: Source, mirrors: Iterable[MirrorProvider], upstream: bool = True) -> list[Candidate]:
    """Every (url, expected digest) pair to try for a source, upstream first, then mirrors in order."""
    out: list[Candidate] = []
    if upstream and source.sha256:
        out.append(Candidate(source.url, source.sha256, "upstream"))
    for m in mirrors:
        out += m.candidates(source)
    return out


def fetch_source(
    store: SourceStore,
    source: Source,
    mirrors: Iterable[MirrorProvider],
    *,
    offline: bool = False,
    upstream: bool = True,
    where: str = "",
    progress: Progress | None = None,
) -> Fetched:
    for digest in source.digests():
        if store.has(digest):
            return Fetched(source, digest, store.path(digest), "store")
    label = f"{where}: " if where else ""
    if offline:
        raise FetchError(
            f"{label}{source.name} is not in the source store and --offline forbids downloading",
            hint="run `hadron fetch` while online, or copy the file into the store",
        )
    mirrors = list(mirrors)
    tried: list[str] = []
    for cand in candidates(source, mirrors, upstream):
        try:
            path = store.download(cand.url, cand.sha256, progress=progress)
            return Fetched(source, cand.sha256, path, cand.url)
        except FetchError as e:
            tried.append(f"    [{cand.via}] {e.message}")
    raise FetchError(
        f"{label}could not fetch {source.name}; tried:\n" + ("\n".join(tried) or "    (nothing to try)"),
        hint="check network access and the mirrors configured in hadron.toml ([fetch] mirrors); "
        "every candidate is judged by the sha256 the recipe pins",
    )


def fetch_recipe(
    store: SourceStore,
    recipe: LoadedRecipe,
    mirrors: Iterable[MirrorProvider],
    *,
    offline: bool = False,
    upstream: bool = True,
) -> list[Fetched]:
    mirrors = list(mirrors)
    return [
        fetch_source(store, s, mirrors, offline=offline, upstream=upstream, where=f"{recipe.path}: sources[{i}]")
        for i, s in enumerate(recipe.recipe.sources)
    ]
