"""Mirror providers: other places a source may be fetched from, judged by the same sha256.

Mirrors are configured outside the recipes (``hadron.toml``: ``[fetch] mirrors = [...]``):

- ``"debian"`` — Debian's source archive. Its base URL is read at run time from the host's apt
  configuration (``/etc/apt/sources.list`` and ``/etc/apt/sources.list.d/*``); a recipe names the
  Debian file in ``sources[].alternatives`` (``provider = "debian"``).
- ``"debian=<url>"`` — the same, with an explicit base URL.
- any URL containing ``{sha256}`` or ``{filename}`` — a generic content mirror.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from debian.deb822 import Deb822

from hadron.engine.recipe import Source
from hadron.errors import HadronError


@dataclass(frozen=True)
class Candidate:
    url: str
    sha256: str
    via: str


class MirrorProvider(Protocol):
    name: str

    def candidates(self, source: Source) -> list[Candidate]: ...

    def signature_urls(self, source: Source) -> list[str]:
        """Where this mirror keeps upstream's signature of ``source`` (it is checked, not pinned)."""
        ...


def pool_prefix(package: str) -> str:
    """Debian pool directory prefix: first letter, or ``lib`` + letter for lib* packages."""
    if package.startswith("lib") and len(package) > 3:
        return package[:4]
    return package[0]


INLINE_KEY = "<inline key>"  # Signed-By holding the key itself rather than a keyring path


@dataclass(frozen=True)
class AptEntry:
    """One repository line or deb822 stanza of the host's apt configuration (enabled ones only)."""

    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: tuple[str, ...]


def apt_entries(etc_apt: Path = Path("/etc/apt")) -> list[AptEntry]:
    """The enabled entries of ``sources.list`` and ``sources.list.d/*.list|*.sources``, in file order."""
    files: list[Path] = []
    if (etc_apt / "sources.list").is_file():
        files.append(etc_apt / "sources.list")
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    entries: list[AptEntry] = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for para in Deb822.iter_paragraphs(text.splitlines()):
                if para.get("Enabled", "yes").strip().lower() == "no":
                    continue
                signed = para.get("Signed-By", "")
                entries.append(AptEntry(
                    tuple(para.get("Types", "").split()), tuple(para.get("URIs", "").split()),
                    tuple(para.get("Suites", "").split()), tuple(para.get("Components", "").split()),
                    (INLINE_KEY,) if "\n" in signed.strip() else tuple(signed.split())))
        else:
            for raw in text.splitlines():
                line = raw.split("#", 1)[0]
                options = dict(o.partition("=")[::2] for o in " ".join(re.findall(r"\[([^\]]*)\]", line)).split())
                words = re.sub(r"\[[^\]]*\]", " ", line).split()
                if len(words) >= 4 and words[0] in ("deb", "deb-src"):
                    entries.append(AptEntry((words[0],), (words[1],), (words[2],), tuple(words[3:]),
                                            tuple(options.get("signed-by", "").replace(",", " ").split())))
    return entries


def apt_debian_uris(etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """Base URIs of the Debian archive named by the host's apt configuration, in file order.

    Security and third-party repositories are skipped: an archive qualifies when one of its
    suites is a plain Debian suite (no ``-security``) and it has the ``main`` component.
    """
    uris: list[str] = []
    for e in apt_entries(etc_apt):
        if ("deb" not in e.types and "deb-src" not in e.types) or "main" not in e.components:
            continue
        if not any(s and not s.endswith("-security") and "/" not in s for s in e.suites):
            continue
        for uri in e.uris:
            uri = uri.rstrip("/")
            if not uri.endswith("-security") and uri not in uris:
                uris.append(uri)
    return [u for u in uris if _looks_like_debian(u)]


def debian_binary_sources(suite: str, etc_apt: Path = Path("/etc/apt")) -> str:
    """The host's apt sources for ``suite`` (and its -updates/-security) binary packages signed by
    Debian's archive keyring, as deb822 text for mmdebstrap; empty when there are none."""
    out: list[str] = []
    for e in apt_entries(etc_apt):
        suites = [s for s in e.suites if s == suite or s.startswith(f"{suite}-")]
        if "deb" not in e.types or not suites or not e.uris:
            continue
        if any(not Path(k).name.startswith("debian-archive") for k in e.signed_by):
            continue
        stanza = (f"Types: deb\nURIs: {' '.join(e.uris)}\nSuites: {' '.join(suites)}\n"
                  f"Components: {' '.join(e.components) or 'main'}")
        if e.signed_by:
            stanza += f"\nSigned-By: {' '.join(e.signed_by)}"
        out.append(stanza)
    return "\n\n".join(out) + "\n" if out else ""


def _looks_like_debian(uri: str) -> bool:
    # The archive path of Debian mirrors ends in /debian (possibly under a snapshot path).
    return uri.startswith(("http://", "https://", "file:/")) and uri.rstrip("/").endswith("debian")


class DebianProvider:
    name = "debian"

    def __init__(self, base_urls: list[str] | None = None, etc_apt: Path = Path("/etc/apt")) -> None:
        self._explicit = base_urls
        self._etc_apt = etc_apt
        self._resolved: list[str] | None = None

    @property
    def base_urls(self) -> list[str]:
        if self._resolved is None:
            self._resolved = self._explicit if self._explicit else apt_debian_uris(self._etc_apt)
        return self._resolved

    def candidates(self, source: Source) -> list[Candidate]:
        out = []
        for alt in source.alternatives:
            if alt.provider != "debian":
                continue
            digest = alt.sha256 or source.sha256
            if digest is None:
                continue
            for base in self.base_urls:
                url = f"{base}/pool/main/{pool_prefix(alt.package)}/{alt.package}/{alt.file}"
                out.append(Candidate(url, digest, "debian" + (" repack" if alt.sha256 else "")))
        return out

    def signature_urls(self, source: Source) -> list[str]:
        # Debian keeps upstream's signature of a pristine orig tarball as <orig>.asc; a repack has none.
        return [f"{base}/pool/main/{pool_prefix(alt.package)}/{alt.package}/{alt.file}.asc"
                for alt in source.alternatives if alt.provider == "debian" and alt.sha256 is None
                for base in self.base_urls]


class TemplateProvider:
    def __init__(self, template: str) -> None:
        self.name = template
        self.template = template

    def candidates(self, source: Source) -> list[Candidate]:
        out = []
        for digest in source.digests():
            url = self.template.replace("{sha256}", digest).replace("{filename}", source.name)
            out.append(Candidate(url, digest, "mirror"))
        return out

    def signature_urls(self, source: Source) -> list[str]:
        return []


def make_providers(specs: list[str], etc_apt: Path = Path("/etc/apt")) -> list[MirrorProvider]:
    providers: list[MirrorProvider] = []
    for spec in specs:
        if spec == "debian":
            providers.append(DebianProvider(etc_apt=etc_apt))
        elif spec.startswith("debian="):
            providers.append(DebianProvider([spec.removeprefix("debian=").rstrip("/")]))
        elif "{sha256}" in spec or "{filename}" in spec:
            providers.append(TemplateProvider(spec))
        else:
            raise HadronError(
                f"unknown mirror {spec!r} in the [fetch] mirrors setting",
                hint='use "debian", "debian=<base url>" or a URL template containing {sha256} or {filename}',
            )
    return providers
