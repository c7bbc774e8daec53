"""Images with their SBOM, provenance and manifest signature in an OCI registry, carried by skopeo.

The manifest signature is a containers "simple signing" signature (OpenPGP), what skopeo and podman
check with a ``signedBy`` policy. It is made for the reference pushed to; it travels in the
registry as one more artifact referring to the image, and (with ``--signatures DIR``) is written in
the lookaside layout of containers-registries.d(5), ``DIR/<repository path>@sha256=<hex>/signature-1``,
for serving to clients over HTTP or a file URL. The referrers index (tag ``sha256-<hex>``) and the
image's tag are pushed last: a push cut short leaves no tag that names a half-pushed image.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from hadron import runner
from hadron.errors import HadronError
from hadron.image import oci
from hadron.trust import keys

SIGNATURE_MEDIA = "application/vnd.hadron.simple-signing.v1+pgp"
LOCAL_TAG = "image"
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("skopeo",)


@dataclass(frozen=True)
class Ref:
    repository: str  # host[:port]/path, no tag
    tag: str

    @property
    def path(self) -> str:
        """The repository without its registry host: where lookaside signatures are stored."""
        return self.repository.split("/", 1)[1] if "/" in self.repository else self.repository

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}"


def parse_ref(ref: str) -> Ref:
    """``host[:port]/path:tag`` (a leading docker:// is allowed)."""
    bare = ref.removeprefix("docker://")
    name, _, tag = bare.rpartition(":")
    if "@" in bare or not name or "/" in tag or "/" not in name:
        raise HadronError(f"{ref!r} is not a registry reference with a tag",
                          hint="write it as HOST[:PORT]/PATH:TAG, e.g. registry.example/hadron/core:0.1")
    return Ref(name, tag)


def _tls(option: str, tls_verify: bool) -> str:
    return f"{option}={'true' if tls_verify else 'false'}"


def _policy(directory: Path, keyring: Path | None) -> Path:
    """A policy.json accepting only images signed by ``keyring`` (anything, when None)."""
    req = ({"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(keyring.resolve())} if keyring
           else {"type": "insecureAcceptAnything"})
    p = directory / "policy.json"
    p.write_text(json.dumps({"default": [{"type": "reject"}],
                             "transports": {"docker": {"": [req]}, "oci": {"": [{"type": "insecureAcceptAnything"}]}}}))
    return p


def _empty_layout(layout: Path) -> None:
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": []}))


def push(layout: Path, tag: str, ref: str, work: Path, image_keys: keys.ImageKeys | None, *,
         tls_verify: bool = True, signatures: Path | None = None) -> dict[str, str]:
    """Push the image tagged ``tag`` in ``layout`` to ``ref`` with its referrers, the manifest signed by
    ``image_keys`` (None: unsigned); returns the manifest digest and what was pushed."""
    r = parse_ref(ref)
    desc, _ = oci.image_manifest(layout, tag)
    digest = str(desc["digest"])
    artifacts = [a for a, _ in oci.referrers(layout, digest)]
    out = {"manifest": digest, "ref": str(r), "signed_by": ""}
    if image_keys is not None:
        manifest = work / "manifest.json"
        manifest.write_bytes(oci.read_blob(layout, digest))
        sig = work / "signature-1"
        with keys.gpg_home(image_keys.gnupg) as env:
            runner.run(["skopeo", "standalone-sign", "--output", str(sig), str(manifest), str(r),
                        image_keys.fingerprint], env=env, what="skopeo standalone-sign (image manifest)")
        artifacts.append(oci.Referrer(SIGNATURE_MEDIA, SIGNATURE_MEDIA, sig.read_bytes(),
                                      {oci.TITLE: "signature-1", "org.opencontainers.image.ref.name": str(r)}))
        out["signed_by"] = image_keys.fingerprint
        if signatures is not None:
            dest = signatures / f"{r.path}@{digest.replace(':', '=')}" / "signature-1"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(sig, dest)
            out["lookaside"] = str(dest)
    refs = work / "referrers"
    _empty_layout(refs)
    index = oci.add_referrers(refs, desc, artifacts)
    rtag = index["annotations"]["org.opencontainers.image.ref.name"]
    policy = _policy(work, None)
    # The artifacts' manifests keep their bytes; skopeo writes the index anew (without the descriptors'
    # artifactType), which readers of it do not rely on: each artifact's manifest says what it is.
    runner.run(["skopeo", "--policy", str(policy), "copy", "--quiet", "--all",
                _tls("--dest-tls-verify", tls_verify), f"oci:{refs}:{rtag}", f"docker://{r.repository}:{rtag}"],
               what="skopeo copy (SBOM, provenance and signature of the image)")
    runner.run(["skopeo", "--policy", str(policy), "copy", "--quiet", "--preserve-digests",
                _tls("--dest-tls-verify", tls_verify),
                f"oci:{layout}:{tag}", f"docker://{r}"], what="skopeo copy (the image)")
    return out


def fetch(ref: str, layout: Path, work: Path, keyring: Path | None, *, tls_verify: bool = True) -> str:
    """Copy the image at ``ref`` (as tag LOCAL_TAG) and its referrers index into OCI layout ``layout``;
    with ``keyring``, skopeo copies the image only if its manifest signature verifies with it. Returns
    the manifest digest the registry serves for ``ref``."""
    r = parse_ref(ref)
    raw = runner.run(["skopeo", "inspect", "--raw", _tls("--tls-verify", tls_verify), f"docker://{r}"],
                     what=f"skopeo inspect {r}").stdout
    digest = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
    rtag = oci.referrers_tag(digest)
    _empty_layout(layout)
    res = runner.run(["skopeo", "--policy", str(_policy(work, None)), "copy", "--quiet", "--all",
                      _tls("--src-tls-verify", tls_verify), f"docker://{r.repository}:{rtag}", f"oci:{layout}:{rtag}"],
                     what="skopeo copy (the image's referrers)", check=False)
    if res.returncode != 0:
        raise HadronError(f"{r}: no SBOM, provenance or signature refers to image {digest} "
                          f"(no {r.repository}:{rtag}): {res.stderr.strip()[-300:]}",
                          hint="push the image with `hadron push`, which carries them along")
    lookaside = work / "lookaside"
    for a, _ in oci.referrers(layout, digest):
        if a.artifact_type == SIGNATURE_MEDIA:
            dest = lookaside / f"{r.path}@{digest.replace(':', '=')}" / "signature-1"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(a.data)
    regd = work / "registries.d"
    regd.mkdir(exist_ok=True)
    (regd / "default.yaml").write_text(f"default-docker:\n  lookaside: file://{lookaside.resolve()}\n")
    res = runner.run(["skopeo", "--policy", str(_policy(work, keyring)), "copy", "--quiet", "--preserve-digests",
                      "--remove-signatures", "--registries.d", str(regd), _tls("--src-tls-verify", tls_verify),
                      f"docker://{r.repository}@{digest}", f"oci:{layout}:{LOCAL_TAG}"],
                     what="skopeo copy (the image, its signature required)", check=False)
    if res.returncode != 0:
        unsigned = "no signature exists" in res.stderr
        raise HadronError(f"{r}: " + ("the image manifest is not signed" if unsigned else
                                      f"skopeo refused the image: {res.stderr.strip()[-400:]}"),
                          hint="push it with `hadron push` and a key directory holding the image signing key"
                          if unsigned else f"the image or its signature was altered, or it was signed by a key "
                          f"other than {keyring}")
    return digest
