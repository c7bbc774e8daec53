"""The image's own systemd-repart, run in the sandbox with the image as the root: it makes the
partitions of an immutable disk (erofs, dm-verity hash tree, signed root hash) and system
extension images from the repart.d definitions the image ships, so that the build and the first
boot read one definition.

repart works on a plain file (``--offline=yes``: no loop devices, no mounts); its JSON report
(``--json=short``) says what each partition became: label, UUID, offset, size and root hash.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hadron.boot.grub import run_in_image
from hadron.errors import HadronError

REPART = "usr/bin/systemd-repart"
DEFINITIONS = "usr/lib/repart.d"
# Where the work directory appears in the sandbox (grub.run_in_image mounts it there).
SANDBOX_OUT = "/tmp/out"


@dataclass(frozen=True)
class RepartPartition:
    type: str  # e.g. "root-x86-64-verity"
    label: str
    uuid: str
    partno: int
    offset: int  # bytes from the start of the disk
    size: int  # bytes
    roothash: str | None
    activity: str  # "create", "unchanged", "resize"

    @property
    def role(self) -> str:
        """The type without the architecture: root, root-verity, root-verity-sig, esp, var …"""
        return self.type.replace("-x86-64", "")


def parse_report(text: str, where: str) -> list[RepartPartition]:
    """repart's --json=short output (one JSON array) as partitions."""
    lines = [ln for ln in text.splitlines() if ln.startswith("[")]
    try:
        rows = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        rows = None
    if not isinstance(rows, list):
        raise HadronError(f"systemd-repart printed no partition report for {where}", hint="see its log")
    return [RepartPartition(r["type"], r.get("label") or "", r["uuid"], int(r["partno"]), int(r["offset"]),
                            int(r["raw_size"]), r.get("roothash") or None, r.get("activity", ""))
            for r in rows]


def check_image(root: Path, image: str) -> Path:
    """The image's repart.d directory, or an error saying what the image lacks."""
    if not (root / REPART).exists():
        raise HadronError(f"image {image} has no systemd-repart (/{REPART})",
                          hint="the systemd recipe must build with repart enabled")
    defs = root / DEFINITIONS
    if not defs.is_dir() or not any(defs.glob("*.conf")):
        raise HadronError(f"image {image} ships no partition definitions (/{DEFINITIONS}/*.conf)",
                          hint="the immutable path needs them; see distro/images/core-immutable")
    return defs


def stage_definitions(defs: Path, work: Path, dropins: Mapping[str, str] | None = None) -> Path:
    """A copy of ``defs`` in ``work`` with build-time drop-ins (definition file name → [Partition]
    settings), e.g. where the ESP's contents come from."""
    staged = work / "repart.d"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(defs, staged, symlinks=True)
    for name, body in (dropins or {}).items():
        if not (staged / name).is_file():
            raise HadronError(f"no partition definition {name} in /{DEFINITIONS}", hint="the drop-in has no target")
        d = staged / f"{name}.d"
        d.mkdir(exist_ok=True)
        (d / "50-hadron-build.conf").write_text(f"[Partition]\n{body}")
    return staged


def run(root: Path, work: Path, disk: Path, *, log: Path, what: str, args: Sequence[str]) -> list[RepartPartition]:
    """Run the image's systemd-repart on ``disk`` (which must be in ``work``); ``args`` are further
    options with paths inside ``work`` given as /tmp/out/…; returns the partition report."""
    if disk.parent != work:
        raise HadronError(f"internal: {disk} is not in the work directory {work}")
    start = log.stat().st_size if log.exists() else 0
    run_in_image(root, ["systemd-repart", "--offline=yes", "--dry-run=no", "--json=short", "--no-pager",
                        *args, f"{SANDBOX_OUT}/{disk.name}"], work, log, what,
                 {"SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_LOG_COLOR": "0"})
    with log.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    return parse_report(text, what)
