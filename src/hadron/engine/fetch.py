"""Sources: a content-addressed store keyed by sha256, fed from upstream and configured mirrors.

A download goes to a temporary file next to the store, is hashed while it streams, and is moved
into place with an atomic rename only when its digest is one the recipe pins and, where the recipe
names upstream's signature, that signature verifies with the pinned keys
(:mod:`hadron.engine.signatures`). Nothing unverified is ever visible under ``sources/sha256/``
(see :mod:`hadron.layout`); each verified signature is kept beside it as a record.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from hadron.engine import signatures
from hadron.engine.mirrors import Candidate, MirrorProvider
from hadron.engine.recipe import LoadedRecipe, Source
from hadron.errors import FetchError
from hadron.layout import CacheLayout

CHUNK = 1 << 20
SIGNATURE_MAX = 64 << 10  # a detached signature is a few hundred bytes; anything this big is not one
Progress = Callable[[int, int | None], None]
Admit = Callable[[Path], None]


@dataclass(frozen=True)
class Fetched:
    source: Source
    digest: str
    path: Path
    origin: str  # "store" or the URL it came from
    trust: str  # how the file was authenticated: its signer, or why its sha256 pin alone is trusted


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

    def download(self, url: str, expected: str, timeout: float = 60.0, progress: Progress | None = None,
                 admit: Admit | None = None) -> Path:
        """Download ``url`` and store it if its sha256 is ``expected`` and ``admit`` (a signature check
        on the downloaded file) does not raise; raise FetchError otherwise."""
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
            if admit is not None:
                admit(tmp)
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

    def signature(self, digest: str) -> dict[str, str] | None:
        """The record of the verified upstream signature of stored source ``digest``, if any."""
        p = self.layout.source_signature(digest)
        try:
            record: dict[str, str] = json.loads(p.read_text())
        except (OSError, ValueError):
            return None
        return record

    def record_signature(self, digest: str, url: str, signature: bytes, verified: signatures.Verified) -> None:
        """Keep a verified signature beside its file (written whole, by rename)."""
        self._ensure()
        self.layout.source_signatures.mkdir(parents=True, exist_ok=True)
        record = {"url": url, "signer": verified.signer, "tool": verified.tool,
                  "signature_sha256": verified.signature_sha256,
                  "signature": base64.b64encode(signature).decode()}
        fd, tmpname = tempfile.mkstemp(prefix="sig-", dir=self.tmp)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out, indent=1, sort_keys=True)
            os.replace(tmpname, self.layout.source_signature(digest))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmpname)

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


def _pin_trust(source: Source, digest: str) -> str:
    if digest != source.sha256:
        note = next((a.note for a in source.alternatives if a.sha256 == digest), None)
        return f"sha256 pin of a repack: {note}"
    return f"sha256 pin, unsigned: {source.unsigned}"


def fetch_signature(
    store: SourceStore,
    source: Source,
    file: Path,
    mirrors: list[MirrorProvider],
    keys_dir: Path,
    *,
    where: str,
    timeout: float = 30.0,
) -> tuple[str, bytes, signatures.Verified]:
    """Download upstream's signature of ``source`` (upstream, then mirrors) and verify it over ``file``.

    Returns the URL it came from, its bytes and the verification; raises FetchError when no copy
    verifies."""
    spec = source.signature
    assert spec is not None
    urls = [spec.url] + [u for m in mirrors for u in m.signature_urls(source)]
    tried: list[str] = []
    for url in urls:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "hadron-fetch/1"})
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                blob = resp.read(SIGNATURE_MAX + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            tried.append(f"    {url}: {getattr(e, 'reason', e)}")
            continue
        if len(blob) > SIGNATURE_MAX:
            tried.append(f"    {url}: larger than {SIGNATURE_MAX} bytes, not a detached signature")
            continue
        try:
            return url, blob, signatures.verify(spec, file, blob, keys_dir, where=where, tmp=store.tmp)
        except FetchError as e:
            tried.append(f"    {url}: {e.message}")
    raise FetchError(
        f"{where}: no copy of upstream's signature of {source.name} verifies; tried:\n" + "\n".join(tried),
        hint="the recipe names a signature, so the file is not used without it: check network access to "
        "upstream or the Debian mirror; if upstream stopped signing, replace `signature` with `unsigned` "
        "and say why",
    )


def _signed_trust(store: SourceStore, source: Source, digest: str) -> str | None:
    """The signer of stored ``digest`` if its recorded signature is by one of the keys pinned now."""
    record = store.signature(digest)
    spec = source.signature
    if record is None or spec is None or record.get("signer") not in spec.keys:
        return None
    return f"signed by {record['signer']} ({record.get('tool', '?')})"


def fetch_source(
    store: SourceStore,
    source: Source,
    mirrors: Iterable[MirrorProvider],
    *,
    keys_dir: Path | None = None,
    offline: bool = False,
    upstream: bool = True,
    where: str = "",
    progress: Progress | None = None,
) -> Fetched:
    """The stored file of ``source``, downloading and verifying it if needed.

    A file with upstream's digest whose recipe names a signature is only used once that signature
    verified; a file stored before its signature was checked gets it checked now."""
    mirrors = list(mirrors)
    label = f"{where}: " if where else ""
    where = where or source.name
    signed = source.signature is not None
    if signed and keys_dir is None:
        raise FetchError(f"{label}{source.name} names a signature but no key directory was given")
    keys = keys_dir or Path()
    for digest in source.digests():
        if not store.has(digest):
            continue
        if not signed or digest != source.sha256:
            return Fetched(source, digest, store.path(digest), "store", _pin_trust(source, digest))
        trust = _signed_trust(store, source, digest)
        if trust is None:
            if offline:
                raise FetchError(
                    f"{label}{source.name} is stored but its upstream signature has not been verified, and "
                    "--offline forbids downloading it",
                    hint="run `hadron fetch` while online",
                )
            url, blob, verified = fetch_signature(store, source, store.path(digest), mirrors, keys, where=where)
            store.record_signature(digest, url, blob, verified)
            trust = verified.describe()
        return Fetched(source, digest, store.path(digest), "store", trust)
    if offline:
        raise FetchError(
            f"{label}{source.name} is not in the source store and --offline forbids downloading",
            hint="run `hadron fetch` while online, or copy the file into the store",
        )
    tried: list[str] = []
    for cand in candidates(source, mirrors, upstream):
        got: list[tuple[str, bytes, signatures.Verified]] = []

        def admit(tmp: Path, got: list[tuple[str, bytes, signatures.Verified]] = got) -> None:
            got.append(fetch_signature(store, source, tmp, mirrors, keys, where=where))

        needs = signed and cand.sha256 == source.sha256
        try:
            path = store.download(cand.url, cand.sha256, progress=progress, admit=admit if needs else None)
        except FetchError as e:
            tried.append(f"    [{cand.via}] {e.message}")
            continue
        if got:
            url, blob, verified = got[0]
            store.record_signature(cand.sha256, url, blob, verified)
            return Fetched(source, cand.sha256, path, cand.url, verified.describe())
        return Fetched(source, cand.sha256, path, cand.url, _pin_trust(source, cand.sha256))
    raise FetchError(
        f"{label}could not fetch {source.name}; tried:\n" + ("\n".join(tried) or "    (nothing to try)"),
        hint="check network access and the mirrors configured in hadron.toml ([fetch] mirrors); "
        "every candidate is judged by the sha256 the recipe pins"
        + (" and by upstream's signature" if signed else ""),
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
        fetch_source(store, s, mirrors, keys_dir=recipe.keys_dir, offline=offline, upstream=upstream,
                     where=f"{recipe.path}: sources[{i}]")
        for i, s in enumerate(recipe.recipe.sources)
    ]
