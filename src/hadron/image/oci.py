"""OCI image layout and docker archive from a root filesystem, reproducibly.

The single layer is a PAX tar with entries sorted by path, mtimes clamped to SOURCE_DATE_EPOCH,
uid/gid 0 and no user or group names, compressed with Python's zlib (gzip, level 6, mtime 0):
the same rootfs gives the same digests on every machine.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hadron import runner
from hadron.errors import HadronError

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
GZIP_LEVEL = 6
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("skopeo",)
GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "riscv64": "riscv64"}


def _clamp(mtime: float, epoch: int) -> int:
    return min(int(mtime), epoch)


def write_layer_tar(rootfs: Path, out: io.BufferedIOBase | Any, epoch: int) -> None:
    """Write ``rootfs`` as a reproducible tar stream to ``out``."""
    seen_inodes: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        paths: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            base = Path(dirpath)
            paths += [base / d for d in dirnames]
            paths += [base / f for f in filenames]
        for p in sorted(paths, key=lambda x: x.relative_to(rootfs).as_posix()):
            rel = p.relative_to(rootfs).as_posix()
            st = p.lstat()
            ti = tarfile.TarInfo(rel)
            ti.mode = stat.S_IMODE(st.st_mode)
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            ti.mtime = _clamp(st.st_mtime, epoch)
            if stat.S_ISDIR(st.st_mode):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif stat.S_ISLNK(st.st_mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = os.readlink(p)
                tf.addfile(ti)
            elif stat.S_ISREG(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and ident in seen_inodes:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = seen_inodes[ident]
                    tf.addfile(ti)
                    continue
                seen_inodes[ident] = rel
                ti.size = st.st_size
                with p.open("rb") as f:
                    tf.addfile(ti, f)
            else:
                raise HadronError(f"{p}: device nodes, fifos and sockets do not belong in an image")


class _HashingWriter(io.RawIOBase):
    def __init__(self, target: Any) -> None:
        self.target = target
        self.h = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.h.update(data)
        self.size += len(data)
        self.target.write(data)
        return len(data)


@dataclass(frozen=True)
class Blob:
    digest: str  # sha256:...
    size: int


def put_blob(layout: Path, data: bytes) -> Blob:
    d = hashlib.sha256(data).hexdigest()
    p = layout / "blobs" / "sha256" / d
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return Blob(f"sha256:{d}", len(data))


def write_layout(
    rootfs: Path,
    layout: Path,
    *,
    tag: str,
    epoch: int,
    arch: str = "x86_64",
    labels: dict[str, str] | None = None,
    cmd: list[str] | None = None,
) -> dict[str, Any]:
    """Write an OCI image layout with one layer; return a summary (digests and sizes)."""
    if layout.exists():
        shutil.rmtree(layout)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    tmp = layout / "blobs" / "layer.tmp"
    with tmp.open("wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=GZIP_LEVEL, mtime=0, filename="") as gz:
            uncompressed = _HashingWriter(gz)
            write_layer_tar(rootfs, uncompressed, epoch)
    layer = Blob(f"sha256:{compressed.h.hexdigest()}", compressed.size)
    os.replace(tmp, layout / "blobs" / "sha256" / compressed.h.hexdigest())
    diff_id = f"sha256:{uncompressed.h.hexdigest()}"
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    config = {
        "created": created,
        "architecture": GOARCH.get(arch, arch),
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd or ["/bin/sh"],
            "Labels": labels or {},
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "hadron image assembly"}],
    }
    cfg = put_blob(layout, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": cfg.digest, "size": cfg.size},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": layer.digest, "size": layer.size}],
        "annotations": {"org.opencontainers.image.created": created, **(labels or {})},
    }
    man = put_blob(layout, _canonical(manifest))
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": man.digest,
                "size": man.size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
                "platform": {"architecture": GOARCH.get(arch, arch), "os": "linux"},
            }
        ],
    }
    (layout / "index.json").write_bytes(_canonical(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return {
        "manifest": man.digest,
        "config": cfg.digest,
        "layer": layer.digest,
        "layer_size": layer.size,
        "diff_id": diff_id,
        "uncompressed_size": uncompressed.size,
    }


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def skopeo(*args: str) -> None:
    runner.run(["skopeo", *args], what=f"skopeo {args[0]}")


def write_docker_archive(layout: Path, tag: str, archive: Path, ref: str) -> None:
    """A `docker load`-able archive of the layout's image, written by skopeo."""
    if archive.exists():
        archive.unlink()
    skopeo("copy", "--quiet", f"oci:{layout}:{tag}", f"docker-archive:{archive}:{ref}")


def push(layout: Path, tag: str, ref: str, *, tls_verify: bool = True) -> None:
    dest = ref if "://" in ref else f"docker://{ref}"
    skopeo("copy", "--quiet", f"--dest-tls-verify={'true' if tls_verify else 'false'}", f"oci:{layout}:{tag}", dest)


# ------------------------------------------------------------------------------ file artifacts
# Files that travel through a registry (update sets, package outputs) go as one OCI artifact: an
# empty config, one layer per file (its name in the standard title annotation), artifactType
# naming what it is. skopeo carries it like any image and checks every blob's digest.
EMPTY_MEDIA = "application/vnd.oci.empty.v1+json"
TITLE = "org.opencontainers.image.title"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~^-]*$")


def _file_blob(layout: Path, src: Path) -> dict[str, object]:
    h = hashlib.sha256()
    with src.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    dest = layout / "blobs" / "sha256" / h.hexdigest()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
    return {"digest": f"sha256:{h.hexdigest()}", "size": src.stat().st_size}


def write_artifact(files: dict[str, Path], layout: Path, tag: str, *, artifact_type: str, file_media: str,
                   annotations: dict[str, str] | None = None) -> str:
    """``files`` (name -> path) as an OCI image layout holding one artifact tagged ``tag``; returns
    the manifest digest."""
    layers = [{"mediaType": file_media, **_file_blob(layout, files[n]), "annotations": {TITLE: n}}
              for n in sorted(files)]
    empty = put_blob(layout, b"{}")
    manifest: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA, "digest": empty.digest, "size": empty.size}, "layers": layers}
    if annotations:
        manifest["annotations"] = annotations
    m = put_blob(layout, _canonical(manifest))
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": MEDIA_MANIFEST, "digest": m.digest, "size": m.size,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return m.digest


def read_artifact(layout: Path, what: str, *, artifact_type: str, file_media: str) -> dict[str, Path]:
    """The files of the one artifact in ``layout`` (name -> blob path, each re-hashed), after
    checking it is an ``artifact_type`` whose layers are all named files; ``what`` names it in errors."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(read_blob(layout, index["manifests"][0]["digest"]))
    if manifest.get("artifactType") != artifact_type:
        raise HadronError(f"{what} is not a {artifact_type} artifact (artifactType {manifest.get('artifactType')!r})")
    out: dict[str, Path] = {}
    for layer in manifest.get("layers", []):
        name = str(layer.get("annotations", {}).get(TITLE, ""))
        if layer.get("mediaType") != file_media or not SAFE_NAME.match(name) or name in out:
            raise HadronError(f"{what} has a layer that is not one of its files: {layer.get('mediaType')} {name!r}")
        digest = str(layer["digest"])
        _check_blob(layout, digest)
        out[name] = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    return out


def _check_blob(layout: Path, digest: str) -> None:
    algo, _, hexd = digest.partition(":")
    path = layout / "blobs" / algo / hexd
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if algo != "sha256" or h.hexdigest() != hexd:
        raise HadronError(f"blob {digest} in the pulled layout does not match its digest")


def read_blob(layout: Path, digest: str) -> bytes:
    _check_blob(layout, digest)
    algo, _, hexd = digest.partition(":")
    return (layout / "blobs" / algo / hexd).read_bytes()


# ------------------------------------------------------------------------------ referrers
# Artifacts about an image (its SBOM, its provenance, its manifest signature) are OCI manifests
# whose ``subject`` is the image's manifest. Registries without the referrers API (and image
# layouts, which have none) find them through the referrers tag schema of the distribution spec:
# an image index tagged ``sha256-<hex of the image manifest digest>`` listing them.
def referrers_tag(digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return f"{algo}-{hexd}"


@dataclass(frozen=True)
class Referrer:
    artifact_type: str
    media_type: str  # of its one layer
    data: bytes
    annotations: dict[str, str]


def image_manifest(layout: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The descriptor (from index.json) and the manifest of the image tagged ``tag`` in ``layout``."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise HadronError(f"{layout}: not an OCI image layout ({e})",
                          hint="name a built image, or a directory holding index.json and blobs/") from None
    for d in index.get("manifests", []):
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            if d.get("mediaType") != MEDIA_MANIFEST:
                raise HadronError(f"{layout}: {tag} is a {d.get('mediaType')}, not an image manifest")
            return d, json.loads(read_blob(layout, str(d["digest"])))
    tags = [str(d.get("annotations", {}).get("org.opencontainers.image.ref.name")) for d in index.get("manifests", [])]
    raise HadronError(f"{layout}: no image tagged {tag!r}", hint=f"tags there: {', '.join(tags) or '(none)'}")


def only_image_tag(layout: Path) -> str:
    """The tag of the one image in ``layout`` (an error when there are none or several)."""
    try:
        index = json.loads((layout / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise HadronError(f"{layout}: not an OCI image layout ({e})") from None
    tags = [str(d.get("annotations", {}).get("org.opencontainers.image.ref.name")) for d in index.get("manifests", [])
            if d.get("mediaType") == MEDIA_MANIFEST]
    if len(tags) != 1:
        raise HadronError(f"{layout}: {len(tags)} images ({', '.join(tags) or 'none'}), cannot tell which to check",
                          hint="pass --tag")
    return tags[0]


def add_referrers(layout: Path, subject: dict[str, Any], artifacts: list[Referrer]) -> dict[str, Any]:
    """Write ``artifacts`` as manifests referring to ``subject`` (an image's descriptor) and their
    referrers index, tagged by the referrers tag schema in index.json (replacing one there);
    returns the index's descriptor."""
    subj = {"mediaType": subject["mediaType"], "digest": subject["digest"], "size": subject["size"]}
    empty = put_blob(layout, b"{}")
    entries = []
    for a in artifacts:
        blob = put_blob(layout, a.data)
        manifest = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST, "artifactType": a.artifact_type,
                    "config": {"mediaType": EMPTY_MEDIA, "digest": empty.digest, "size": empty.size},
                    "layers": [{"mediaType": a.media_type, "digest": blob.digest, "size": blob.size}],
                    "subject": subj, "annotations": a.annotations}
        m = put_blob(layout, _canonical(manifest))
        entries.append({"mediaType": MEDIA_MANIFEST, "digest": m.digest, "size": m.size,
                        "artifactType": a.artifact_type, "annotations": a.annotations})
    idx = put_blob(layout, _canonical({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": entries}))
    tag = referrers_tag(str(subject["digest"]))
    desc = {"mediaType": MEDIA_INDEX, "digest": idx.digest, "size": idx.size,
            "annotations": {"org.opencontainers.image.ref.name": tag}}
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = [d for d in index["manifests"]
                          if d.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag] + [desc]
    tmp = layout / "index.json.tmp"
    tmp.write_bytes(_canonical(index))
    os.replace(tmp, layout / "index.json")
    return desc


def referrers(layout: Path, digest: str) -> list[tuple[Referrer, str]]:
    """The artifacts referring to manifest ``digest`` in ``layout`` and each one's manifest digest;
    every blob is re-hashed, and an artifact whose subject is another manifest is an error."""
    tag = referrers_tag(digest)
    index = json.loads((layout / "index.json").read_text())
    found = [d for d in index.get("manifests", [])
             if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if not found:
        return []
    out = []
    for d in json.loads(read_blob(layout, str(found[0]["digest"]))).get("manifests", []):
        m = json.loads(read_blob(layout, str(d["digest"])))
        if m.get("subject", {}).get("digest") != digest:
            raise HadronError(f"{layout}: artifact {d['digest']} is listed as referring to {digest} but its subject "
                              f"is {m.get('subject', {}).get('digest')}",
                              hint="the referrers index was altered; fetch or build the image again")
        layers = m.get("layers", [])
        if len(layers) != 1:
            raise HadronError(f"{layout}: artifact {d['digest']} has {len(layers)} layers, expected one")
        out.append((Referrer(str(m.get("artifactType")), str(layers[0]["mediaType"]),
                             read_blob(layout, str(layers[0]["digest"])), dict(m.get("annotations", {}))),
                    str(d["digest"])))
    return out


def layer_files(layout: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """The regular files of an image's layers (path → SHA-256 of the content), hard links included;
    each layer blob is checked against its digest while it is read."""
    out: dict[str, str] = {}
    for layer in manifest.get("layers", []):
        digest = str(layer["digest"])
        try:
            _check_blob(layout, digest)
        except FileNotFoundError:
            raise HadronError(f"{layout}: layer {digest} is missing", hint="fetch or build the image again") from None
        except HadronError:
            raise HadronError(f"{layout}: layer {digest} does not match its digest",
                              hint="the image was altered; fetch or build it again") from None
        algo, _, hexd = digest.partition(":")
        with tarfile.open(layout / "blobs" / algo / hexd, mode="r:*") as tf:
            for m in tf:
                name = m.name.removeprefix("./")
                if m.isreg():
                    h = hashlib.sha256()
                    f = tf.extractfile(m)
                    if f is None:
                        raise HadronError(f"{layout}: layer {digest}: cannot read /{name}")
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                    out[name] = h.hexdigest()
                elif m.islnk():
                    out[name] = out.get(m.linkname.removeprefix("./"), "")
                else:
                    out.pop(name, None)
    return out
