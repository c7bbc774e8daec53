"""Check an image against what it says about itself: the provenance's signature, that the signed
Statement's subject is this image's manifest, that the SBOM is the one the provenance names and
lists exactly the image's files with their content, and (for an image in a registry) that the
manifest's signature is accepted by skopeo under a policy that requires it."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key

from hadron.errors import HadronError
from hadron.image import oci
from hadron.trust import provenance, registry, sbom


@dataclass
class Report:
    where: str
    manifest: str
    provenance_key: str
    sbom_packages: int
    sbom_files: int
    dependencies: int
    manifest_signature: str | None = None  # the OpenPGP key that signed the manifest, when checked
    seconds: float = 0.0
    checks: list[str] = field(default_factory=list)

    def doc(self) -> dict[str, Any]:
        return {"where": self.where, "manifest": self.manifest, "provenance_key": self.provenance_key,
                "sbom_packages": self.sbom_packages, "sbom_files": self.sbom_files,
                "resolved_dependencies": self.dependencies, "manifest_signature": self.manifest_signature,
                "seconds": round(self.seconds, 2), "checks": self.checks}


def verify_layout(layout: Path, tag: str, key: Key) -> Report:
    """Check the image tagged ``tag`` in OCI layout ``layout`` and the artifacts referring to it."""
    t0 = time.monotonic()
    where = f"{layout}:{tag}"
    desc, manifest = oci.image_manifest(layout, tag)
    digest = str(desc["digest"])
    found = {r.artifact_type: r for r, _ in oci.referrers(layout, digest)}
    prov, bom = found.get(provenance.DSSE_MEDIA), found.get(sbom.SPDX_MEDIA)
    if prov is None or bom is None:
        missing = [n for n, r in (("provenance", prov), ("SBOM", bom)) if r is None]
        raise HadronError(f"{where}: no {' and no '.join(missing)} refers to image {digest}",
                          hint="build the image with this Hadron (hadron build), or push it with `hadron push`, "
                               "which carries both along")
    stmt, _ = provenance.open_envelope(prov.data, f"{where} provenance", key)
    checks = [f"provenance signed by key {key.keyid[:16]}"]
    subjects = [s.get("digest", {}).get("sha256") for s in stmt.get("subject", [])]
    if digest.removeprefix("sha256:") not in subjects:
        raise HadronError(f"{where}: the provenance is about {', '.join(map(str, subjects))}, "
                          f"not this image ({digest})",
                          hint="the provenance was made for another image: it does not vouch for this one")
    checks.append(f"provenance subject is the image manifest {digest}")
    named = [b.get("digest", {}).get("sha256") for b in stmt["predicate"]["runDetails"].get("byproducts", [])
             if b.get("name") == provenance.SBOM_NAME]
    if hashlib.sha256(bom.data).hexdigest() not in named:
        raise HadronError(f"{where}: the SBOM is not the one the signed provenance names",
                          hint="the SBOM was replaced or altered after the build")
    checks.append("SBOM is the one the signed provenance names")
    doc = json.loads(bom.data)
    listed = sbom.files_of(doc)
    actual = oci.layer_files(layout, manifest)
    _compare(where, listed, actual)
    checks.append(f"SBOM lists exactly the image's {len(actual)} files, each with its SHA-256")
    deps = stmt["predicate"]["buildDefinition"].get("resolvedDependencies", [])
    return Report(where, digest, key.keyid, len(doc.get("packages", [])), len(listed), len(deps),
                  seconds=time.monotonic() - t0, checks=checks)


def _compare(where: str, listed: dict[str, str], actual: dict[str, str]) -> None:
    problems = [f"/{p}: in the image, not in the SBOM" for p in sorted(set(actual) - set(listed))]
    problems += [f"/{p}: in the SBOM, not in the image" for p in sorted(set(listed) - set(actual))]
    problems += [f"/{p}: content differs from the SBOM's (sha256 {actual[p][:16]}…, SBOM says {listed[p][:16]}…)"
                 for p in sorted(set(listed) & set(actual)) if listed[p] != actual[p]]
    if problems:
        raise HadronError(f"{where}: the image's files do not match its SBOM:\n  " + "\n  ".join(problems[:20])
                          + (f"\n  and {len(problems) - 20} more" if len(problems) > 20 else ""),
                          hint="the image was altered after it was built; do not use it")


def verify_remote(ref: str, key: Key, keyring: Path | None, *, tls_verify: bool = True) -> Report:
    """Check the image at registry reference ``ref``: its manifest signature with skopeo under a policy
    requiring it (``keyring``: the OpenPGP public key; None skips that check), then what
    :func:`verify_layout` checks, on a copy fetched by digest."""
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hadron-verify-") as tmp:
        layout = Path(tmp) / "oci"
        digest = registry.fetch(ref, layout, Path(tmp), keyring, tls_verify=tls_verify)
        report = verify_layout(layout, registry.LOCAL_TAG, key)
        if report.manifest != digest:
            raise HadronError(f"{ref}: the registry's manifest {digest} is not the one fetched ({report.manifest})")
    report.where = ref
    if keyring is not None:
        report.manifest_signature = str(keyring)
        report.checks.insert(0, f"manifest signature accepted by skopeo (policy signedBy {keyring})")
    report.seconds = time.monotonic() - t0
    return report
