"""The SPDX 2.3 (JSON) software bill of materials of an image.

One package for the image, one per component (a package whose runtime output is in the image), one
per upstream source a component was built from and one per build-only input (toolchain, libraries
linked statically, build tools built by Hadron). Every regular file of the image is an SPDX file
with its SHA-1 and SHA-256, contained by the component that installed it or, for files made by the
image itself (os-release, users, configuration), by the image. Relationships: the document
DESCRIBES the image; the image CONTAINS components and its own files; a component CONTAINS its
files and is GENERATED_FROM its sources; a build-only input is a BUILD_DEPENDENCY_OF the
components whose build used it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hadron import __version__

SPDX_MEDIA = "application/spdx+json"
NOASSERTION = "NOASSERTION"
NAMESPACE = "https://github.com/hadron-linux/hadron/spdx"


@dataclass(frozen=True)
class Source:
    url: str
    sha256: str


@dataclass(frozen=True)
class Component:
    """A package as the SBOM and the provenance name it."""

    name: str
    version: str
    license: str
    homepage: str
    output: str  # the output's content digest (hex sha256)
    sources: tuple[Source, ...] = ()
    inputs: dict[str, str] = field(default_factory=dict)  # build inputs: name → output digest

    @property
    def purl(self) -> str:
        q = f"?download_url={quote(self.sources[0].url, safe='')}" if self.sources else ""
        return f"pkg:generic/{quote(self.name)}@{quote(self.version)}{q}"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the root, "/"-separated
    sha1: str
    sha256: str


def hash_files(root: Path) -> list[FileEntry]:
    """Every regular file under ``root`` (symlinks and directories are not files), sorted by path."""
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_symlink() or not p.is_file():
                continue
            s1, s256 = hashlib.sha1(), hashlib.sha256()
            with p.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    s1.update(chunk)
                    s256.update(chunk)
            out.append(FileEntry(p.relative_to(root).as_posix(), s1.hexdigest(), s256.hexdigest()))
    return sorted(out, key=lambda e: e.path)


def _id(kind: str, name: str) -> str:
    return f"SPDXRef-{kind}-" + re.sub(r"[^A-Za-z0-9.-]", "-", name)


def _verification_code(files: list[FileEntry]) -> dict[str, str]:
    joined = "".join(sorted(f.sha1 for f in files))
    return {"packageVerificationCodeValue": hashlib.sha1(joined.encode()).hexdigest()}


def _package(spdx_id: str, c: Component, files: list[FileEntry] | None) -> dict[str, Any]:
    pkg: dict[str, Any] = {
        "SPDXID": spdx_id,
        "name": c.name,
        "versionInfo": c.version,
        "downloadLocation": c.sources[0].url if c.sources else NOASSERTION,
        "homepage": c.homepage,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": c.license,
        "copyrightText": NOASSERTION,
        "filesAnalyzed": bool(files),
        "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                          "referenceLocator": c.purl}],
        "comment": f"Hadron output sha256:{c.output}",
    }
    if c.sources:
        pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": c.sources[0].sha256}]
    if files:
        pkg["packageVerificationCode"] = _verification_code(files)
    return pkg


def document(*, image: str, version: str, manifest_digest: str, epoch: int, files: list[FileEntry],
             owners: dict[str, str], components: list[Component], build_inputs: list[Component]) -> dict[str, Any]:
    """The SPDX document of image ``image`` whose OCI manifest is ``manifest_digest`` (sha256:…).

    ``owners`` maps a file's path to the component that installed it; other files are the image's."""
    hexd = manifest_digest.removeprefix("sha256:")
    image_id = "SPDXRef-Image"
    by_owner: dict[str, list[FileEntry]] = {}
    for f in files:
        by_owner.setdefault(owners.get(f.path, ""), []).append(f)
    image_pkg: dict[str, Any] = {
        "SPDXID": image_id,
        "name": f"hadron-{image}",
        "versionInfo": version,
        "downloadLocation": NOASSERTION,
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "primaryPackagePurpose": "CONTAINER",
        "filesAnalyzed": bool(by_owner.get("")),
        "checksums": [{"algorithm": "SHA256", "checksumValue": hexd}],
        "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                          "referenceLocator": f"pkg:oci/hadron-{image}@sha256%3A{hexd}?tag={quote(version)}"}],
        "comment": f"OCI image manifest {manifest_digest}",
    }
    if by_owner.get(""):
        image_pkg["packageVerificationCode"] = _verification_code(by_owner[""])
    packages = [image_pkg]
    rels: list[dict[str, str]] = [_rel("SPDXRef-DOCUMENT", "DESCRIBES", image_id)]
    file_ids: dict[str, str] = {}
    spdx_files = []
    for i, f in enumerate(files):
        fid = f"SPDXRef-File-{i}"
        file_ids[f.path] = fid
        spdx_files.append({"SPDXID": fid, "fileName": f"./{f.path}",
                           "checksums": [{"algorithm": "SHA1", "checksumValue": f.sha1},
                                         {"algorithm": "SHA256", "checksumValue": f.sha256}],
                           "licenseConcluded": NOASSERTION, "copyrightText": NOASSERTION})
    for f in by_owner.get("", []):
        rels.append(_rel(image_id, "CONTAINS", file_ids[f.path]))
    in_image = {c.name for c in components}
    for c in components:
        cid = _id("Package", c.name)
        packages.append(_package(cid, c, by_owner.get(c.name, [])))
        rels.append(_rel(image_id, "CONTAINS", cid))
        rels += [_rel(cid, "CONTAINS", file_ids[f.path]) for f in by_owner.get(c.name, [])]
        for i, s in enumerate(c.sources):
            sid = _id("Source", f"{c.name}-{i}")
            packages.append({
                "SPDXID": sid, "name": f"{c.name}-source-{i}", "versionInfo": c.version,
                "packageFileName": s.url.rsplit("/", 1)[-1], "downloadLocation": s.url,
                "checksums": [{"algorithm": "SHA256", "checksumValue": s.sha256}],
                "primaryPackagePurpose": "SOURCE", "filesAnalyzed": False, "licenseConcluded": NOASSERTION,
                "licenseDeclared": c.license, "copyrightText": NOASSERTION})
            rels.append(_rel(cid, "GENERATED_FROM", sid))
    for d in build_inputs:
        if d.name in in_image:
            continue
        did = _id("BuildInput", d.name)
        packages.append(_package(did, d, None))
        rels += [_rel(did, "BUILD_DEPENDENCY_OF", _id("Package", c.name))
                 for c in components if c.inputs.get(d.name) == d.output]
    return {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"hadron-{image}-{version}",
        "documentNamespace": f"{NAMESPACE}/{quote(image)}-{quote(version)}-{hexd}",
        "creationInfo": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch)),
                         "creators": [f"Tool: hadron-{__version__}"]},
        "packages": packages,
        "files": spdx_files,
        "relationships": rels,
    }


def _rel(a: str, kind: str, b: str) -> dict[str, str]:
    return {"spdxElementId": a, "relationshipType": kind, "relatedSpdxElement": b}


def files_of(doc: dict[str, Any]) -> dict[str, str]:
    """The files an SBOM lists: path (without ``./``) → SHA-256."""
    out = {}
    for f in doc.get("files", []):
        sha = next((c["checksumValue"] for c in f.get("checksums", []) if c.get("algorithm") == "SHA256"), "")
        out[str(f.get("fileName", "")).removeprefix("./")] = str(sha)
    return out
