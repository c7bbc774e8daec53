"""Every bootable artifact an image's boot paths give, written into one directory, and where two
copies of one differ (which GPT partition, which PE section): what ``hadron verify-repro`` makes
twice and compares.

- trusted: the signed UKI (``NAME.efi``) and the trusted disk (``NAME-trusted.raw``);
- grub: the GRUB disk (``NAME-grub.raw``);
- immutable: the immutable disk (``NAME-immutable.raw``) and the signed UKI it carries
  (``NAME-immutable.efi``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hadron.boot import disk, grub, immutable, secureboot, trusted, uki
from hadron.engine.fetch import file_sha256
from hadron.errors import HadronError
from hadron.image.build import BuiltImage

SECTOR = 512
CHUNK = 1 << 20


@dataclass(frozen=True)
class Artifact:
    name: str  # file name in the directory
    kind: str  # "uki" or "disk"
    path: Path

    def digest(self) -> str:
        return "sha256:" + file_sha256(self.path)


def make_all(img: BuiltImage, boot: Sequence[str], keys: secureboot.KeySet, out_dir: Path, *,
             epoch: int) -> list[Artifact]:
    """Write the artifacts of each of ``boot`` (the image's boot paths) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Artifact] = []
    for path in boot:
        if path == "trusted":
            efi = out_dir / f"{img.name}.efi"
            trusted.build_signed_uki(img, keys, efi, epoch=epoch)
            raw = out_dir / f"{img.name}-trusted.raw"
            trusted.build_trusted_disk(img, keys, raw, epoch=epoch)
            made += [Artifact(efi.name, "uki", efi), Artifact(raw.name, "disk", raw)]
        elif path == "grub":
            raw = out_dir / f"{img.name}-grub.raw"
            grub.build_grub_disk(img, raw, log=out_dir / f"{img.name}-grub.log", epoch=epoch)
            made.append(Artifact(raw.name, "disk", raw))
        elif path == "immutable":
            raw = out_dir / f"{img.name}-immutable.raw"
            efi = out_dir / f"{img.name}-immutable.efi"
            immutable.build_immutable_disk(img, keys, raw, log=out_dir / f"{img.name}-immutable.log", epoch=epoch,
                                           keep_uki=efi)
            made += [Artifact(efi.name, "uki", efi), Artifact(raw.name, "disk", raw)]
        else:
            raise HadronError(f"image {img.name}: unknown boot path {path!r}",
                              hint="boot paths: trusted, grub, immutable")
    return made


def _first_difference(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _range_digest(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(start)
        left = length
        while left > 0 and (chunk := f.read(min(CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def disk_differences(a: Path, b: Path) -> list[str]:
    """Where two disk images differ: the partition table, then each partition by number, type and
    UUID, compared by content."""
    ta, tb = disk.partition_table(a), disk.partition_table(b)
    out: list[str] = []
    if a.stat().st_size != b.stat().st_size:
        out.append(f"size: {a.stat().st_size} vs {b.stat().st_size} bytes")
    if ta != tb:
        out.append("partition table: " + "; ".join(
            f"{n}: {pa} vs {pb}" for n, (pa, pb) in enumerate(zip(ta, tb, strict=False)) if pa != pb)
            + (f"; {len(ta)} vs {len(tb)} partitions" if len(ta) != len(tb) else ""))
    else:
        first = min((p.start for p in ta), default=0) * SECTOR
        if _range_digest(a, 0, first) != _range_digest(b, 0, first):
            out.append("GPT header or the gap before the first partition (boot code)")
    for n, (pa, pb) in enumerate(zip(ta, tb, strict=False), start=1):
        if pa.start != pb.start or pa.sectors != pb.sectors:
            continue
        if _range_digest(a, pa.start * SECTOR, pa.sectors * SECTOR) != _range_digest(b, pb.start * SECTOR,
                                                                                     pb.sectors * SECTOR):
            out.append(f"partition {n} (type {pa.type_guid}, uuid {pa.uuid}): contents differ")
    return out or ["bytes outside the partitions (the backup GPT)"]


def uki_differences(a: Path, b: Path) -> list[str]:
    """Where two UKIs (or other PE files) differ: each section by name, with the first differing
    offset in it; else the headers or the Authenticode signature."""
    sa, sb = uki.read_uki_sections(a), uki.read_uki_sections(b)
    out = [f"section {name}: only in {'the first' if name in sa else 'the second'}"
           for name in sorted(set(sa) ^ set(sb))]
    for name in sa:
        if name in sb and sa[name] != sb[name]:
            out.append(f"section {name}: {len(sa[name])} vs {len(sb[name])} bytes, first difference at offset "
                       f"{_first_difference(sa[name], sb[name])}")
    return out or ["PE headers or the Authenticode signature (every section is identical)"]


def differences(kind: str, a: Path, b: Path) -> list[str]:
    return disk_differences(a, b) if kind == "disk" else uki_differences(a, b)
