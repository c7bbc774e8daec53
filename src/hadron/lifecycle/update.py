"""Whole-image updates in the form systemd-sysupdate consumes (the image's /usr/lib/sysupdate.d).

publish: the immutable disk of the image at a version is written (by the image's own repart) and
its slot A taken apart into the transfer sources: ``<ID>_<V>_<uuid>.root.raw`` (the erofs, as many
blocks as dm-verity covers), ``<ID>_<V>_<uuid>.verity.raw``, ``<ID>_<V>_<uuid>.verity-sig.raw`` and
the signed UKI ``<ID>_<V>.efi``. The UUIDs are the partitions' own, so the UKI's roothash= finds the
slot sysupdate writes them to. ``SHA256SUMS`` lists every file of the directory and
``SHA256SUMS.p7s`` signs it (PKCS#7, the db key).

verify: the signature against the db certificate, every checksum, every file listed and every
version complete, and (given the running version) nothing older or equal. systemd-sysupdate checks
nothing for a local directory source, so a directory is verified before it is handed over.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hadron import runner
from hadron.boot import disk, immutable, repart, secureboot
from hadron.engine.fetch import file_sha256
from hadron.errors import HadronError
from hadron.image import oci
from hadron.image.build import BuiltImage

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("openssl", "skopeo")
SUMS = "SHA256SUMS"
SUMS_SIG = "SHA256SUMS.p7s"
TRANSFERS = "usr/lib/sysupdate.d"
# slot A's partitions → the suffix of their transfer source file
PARTS = {"root": "root", "root-verity": "verity", "root-verity-sig": "verity-sig"}
FILE_RE = re.compile(r"^(?P<id>[^_]+)_(?P<version>[^_+]+)(?:_(?P<uuid>[0-9a-f-]{36})\.(?P<kind>root|verity|verity-sig)"
                     r"\.raw|\.efi)$")
BLOCK = 4096


def version_key(v: str) -> list[tuple[int, int | str]]:
    """A sort key close to systemd's version comparison: runs of digits compare as numbers, other
    runs as text, '~' sorts before anything, even the end of the string."""
    out: list[tuple[int, int | str]] = []
    for run in re.findall(r"~|\d+|[A-Za-z]+|[^A-Za-z0-9~]+", v):
        if run == "~":
            out.append((-2, 0))
        elif run.isdigit():
            out.append((2, int(run)))
        elif run.isalpha():
            out.append((1, run))
        else:
            out.append((0, 0))
    return [*out, (-1, 0)]


def newer(a: str, b: str) -> bool:
    return version_key(a) > version_key(b)


def verity_data_bytes(hash_file: Path) -> int:
    """How many bytes of the data device the dm-verity superblock at the start of ``hash_file`` covers."""
    with open(hash_file, "rb") as f:
        sb = f.read(512)
    if sb[:8] != b"verity\0\0":
        raise HadronError(f"{hash_file} does not start with a dm-verity superblock")
    block = int.from_bytes(sb[64:68], "little")
    blocks = int.from_bytes(sb[72:80], "little")
    return block * blocks


def _copy_range(src: Path, offset: int, length: int, dest: Path) -> None:
    with open(src, "rb") as f, open(dest, "wb") as out:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 4 << 20))
            if not chunk:
                raise HadronError(f"{src} ends before byte {offset + length}")
            out.write(chunk)
            left -= len(chunk)


def _trim_zero_blocks(path: Path) -> None:
    """Drop the all-zero 4 KiB blocks at the end of ``path`` (the unused rest of a partition)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        end = size
        while end > BLOCK:
            f.seek(end - BLOCK)
            if any(f.read(BLOCK)):
                break
            end -= BLOCK
        f.truncate(end)


@dataclass(frozen=True)
class Published:
    directory: Path
    image_id: str
    version: str
    files: tuple[str, ...]
    roothash: str


def sign_sums(keys: secureboot.KeySet, directory: Path) -> None:
    """Write SHA256SUMS for every file in ``directory`` and its detached PKCS#7 signature."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in (SUMS, SUMS_SIG)
                   and not p.name.startswith("."))
    lines = [f"{file_sha256(directory / n)}  {n}\n" for n in names]
    tmp = directory / f".{SUMS}.tmp"
    tmp.write_text("".join(lines))
    sig = directory / f".{SUMS_SIG}.tmp"
    runner.run(["openssl", "smime", "-sign", "-binary", "-noattr", "-in", tmp, "-signer", keys.db.crt,
                "-inkey", keys.db.key, "-outform", "DER", "-out", sig], what="signing SHA256SUMS")
    os.replace(tmp, directory / SUMS)
    os.replace(sig, directory / SUMS_SIG)


def check_image(img: BuiltImage) -> None:
    tdir = img.rootfs / TRANSFERS
    if not tdir.is_dir() or not any(tdir.glob("*.transfer")):
        raise HadronError(f"image {img.name} has no systemd-sysupdate transfers (/{TRANSFERS}/*.transfer)",
                          hint="publish an image with the immutable layout, e.g. core-immutable")
    repart.check_image(img.rootfs, img.name)


@disk.standard_umask()
def publish(img: BuiltImage, keys: secureboot.KeySet, version: str, directory: Path, *, log: Path,
            check: bool = False, probe: str | None = None, extra_files: dict[str, bytes] | None = None,
            epoch: int = 0) -> Published:
    """Add version ``version`` of ``img`` to the update directory and re-sign its SHA256SUMS."""
    immutable.check_version(version)
    check_image(img)
    directory.mkdir(parents=True, exist_ok=True)
    if any(m["version"] == version for m in _entries(directory)):
        raise HadronError(f"{directory} already holds version {version}",
                          hint="publish a new version, or remove that version's files first")
    with tempfile.TemporaryDirectory(prefix=".hadron-publish-", dir=directory) as td:
        work = Path(td)
        staged = work / "set"
        staged.mkdir()
        d = immutable.build_immutable_disk(img, keys, work / "disk.raw", log=log, version=version, check=check,
                                           probe=probe, extra_files=extra_files, epoch=epoch,
                                           keep_uki=staged / "uki.efi")
        uki_name = f"{d.image_id}_{version}.efi"
        (staged / "uki.efi").rename(staged / uki_name)
        slot = {p.role: p for p in d.partitions if p.label.startswith(f"{d.image_id}_{version}")}
        names = [uki_name]
        hash_part = slot["root-verity"]
        for role, kind in PARTS.items():
            p = slot.get(role)
            if p is None:
                raise HadronError(f"the disk of {img.name} has no {role} partition labelled {d.image_id}_{version}")
            name = f"{d.image_id}_{version}_{p.uuid}.{kind}.raw"
            _copy_range(d.path, p.offset, p.size, staged / name)
            names.append(name)
        data = staged / names[1]
        verity = staged / f"{d.image_id}_{version}_{hash_part.uuid}.verity.raw"
        with open(data, "r+b") as f:
            f.truncate(verity_data_bytes(verity))
        _trim_zero_blocks(verity)
        _trim_zero_blocks(staged / names[3])
        for n in names:
            os.replace(staged / n, directory / n)
    sign_sums(keys, directory)
    return Published(directory, d.image_id, version, tuple(names), d.roothash)


def _entries(directory: Path) -> list[dict[str, str]]:
    out = []
    for p in directory.iterdir():
        m = FILE_RE.match(p.name)
        if m:
            out.append({"name": p.name, **{k: v or "" for k, v in m.groupdict().items()}})
    return out


def verify(directory: Path, db_cert: Path, *, current: str | None = None) -> dict[str, list[str]]:
    """Check an update directory; returns version → its files. Raises HadronError naming the file."""
    sums, sig = directory / SUMS, directory / SUMS_SIG
    for f in (sums, sig):
        if not f.is_file():
            raise HadronError(f"{f} is missing", hint="an update directory is made by `hadron update publish`")
    res = runner.run(["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in", sig, "-content", sums,
                      "-nointern", "-certfile", db_cert, "-CAfile", db_cert, "-partial_chain", "-purpose", "any",
                      "-out", "/dev/null"], check=False, what="checking the SHA256SUMS signature")
    if res.returncode != 0:
        raise HadronError(f"{sig} is not a valid signature of {sums} by {db_cert}",
                          hint="the set was changed after it was signed, or signed with another key: do not install it")
    listed: dict[str, str] = {}
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        m = re.match(r"^([0-9a-f]{64}) [ *](\S+)$", line)
        if not m or "/" in m.group(2):
            raise HadronError(f"{sums}:{n}: not a checksum line: {line!r}")
        listed[m.group(2)] = m.group(1)
    present = {p.name for p in directory.iterdir() if p.is_file() and p.name not in (SUMS, SUMS_SIG)
               and not p.name.startswith(".")}
    for name in sorted(present - set(listed)):
        raise HadronError(f"{directory / name} is not listed in {sums}", hint="remove it, or publish again")
    for name, digest in sorted(listed.items()):
        if name not in present:
            raise HadronError(f"{directory / name} is listed in {sums} but missing")
        if file_sha256(directory / name) != digest:
            raise HadronError(f"{directory / name} does not match its checksum in {sums}",
                              hint="the file was changed or damaged: do not install this set")
    versions: dict[str, list[str]] = {}
    for e in _entries(directory):
        versions.setdefault(e["version"], []).append(e["name"])
    for v, files in versions.items():
        kinds = {FILE_RE.match(f).group("kind") or "efi" for f in files}  # type: ignore[union-attr]
        if kinds != {"root", "verity", "verity-sig", "efi"}:
            raise HadronError(f"version {v} in {directory} is incomplete: it has {sorted(kinds)}",
                              hint="each version needs its .efi, .root.raw, .verity.raw and .verity-sig.raw")
        if current is not None and not newer(v, current):
            raise HadronError(f"version {v} in {directory} is not newer than the running version {current}",
                              hint="systemd-sysupdate only moves forward; publish a higher version")
    if not versions:
        raise HadronError(f"{directory} holds no update files")
    return versions


# ------------------------------------------------------------------------------ through a registry
# An update set travels as one OCI file artifact (see hadron.image.oci.write_artifact).
ARTIFACT_TYPE = "application/vnd.hadron.update.v1"
FILE_MEDIA = "application/vnd.hadron.update.file.v1"


def to_layout(directory: Path, layout: Path, tag: str) -> None:
    """The update directory as an OCI image layout holding one artifact tagged ``tag``."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    oci.write_artifact({n: directory / n for n in names}, layout, tag, artifact_type=ARTIFACT_TYPE,
                       file_media=FILE_MEDIA)


def push(directory: Path, db_cert: Path, ref: str, *, tls_verify: bool = True) -> dict[str, list[str]]:
    """Verify the update directory, then push it to ``ref`` (registry/repository:tag)."""
    versions = verify(directory, db_cert)
    with tempfile.TemporaryDirectory(prefix="hadron-update-oci-") as td:
        to_layout(directory, Path(td) / "layout", "update")
        runner.run(["skopeo", "copy", "--quiet", f"--dest-tls-verify={'true' if tls_verify else 'false'}",
                    f"oci:{Path(td) / 'layout'}:update", f"docker://{ref}"], what=f"pushing the update set to {ref}")
    return versions


def pull(ref: str, directory: Path, db_cert: Path, *, current: str | None = None,
         tls_verify: bool = True) -> dict[str, list[str]]:
    """Fetch the artifact at ``ref``, verify it (signature, checksums, versions) and only then
    write it to ``directory``, which must not exist yet."""

    if directory.exists():
        raise HadronError(f"{directory} already exists", hint="pull into a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hadron-pull-", dir=directory.parent) as td:
        layout, staged = Path(td) / "layout", Path(td) / "set"
        runner.run(["skopeo", "copy", "--quiet", f"--src-tls-verify={'true' if tls_verify else 'false'}",
                    f"docker://{ref}", f"oci:{layout}:update"], what=f"pulling the update set {ref}")
        files = oci.read_artifact(layout, ref, artifact_type=ARTIFACT_TYPE, file_media=FILE_MEDIA)
        staged.mkdir()
        for name, blob in files.items():
            shutil.copyfile(blob, staged / name)
        versions = verify(staged, db_cert, current=current)
        os.replace(staged, directory)
    return versions
