"""The immutable disk: the trusted path (signed systemd-boot, signed UKI, Secure Boot, TPM) with a
read-only, verity-protected root in A/B slots, boot counting and a persistent /var.

Steps, each small:
- prepare_root: a copy of the image's rootfs as the disk will hold it (mount points, no /boot,
  the version stamped into os-release's IMAGE_VERSION);
- make_slots: the image's systemd-repart, from the image's /usr/lib/repart.d, writes slot A (erofs
  + dm-verity hash tree + root hash signed with the db key) and the empty slot B, defers the ESP
  and leaves /var to the first boot; its report gives the root hash;
- the signed UKI, its command line carrying ``roothash=``, so that under Secure Boot only that root
  can boot; it is named ``<IMAGE_ID>_<version>+<tries>.efi`` for systemd-boot's boot counting;
- make_esp and add_esp: the ESP (signed systemd-boot, loader.conf without ``default``, the UKI)
  added by repart in a second run, which also sizes the disk with room for /var.
Nothing is left at the target path unless every step succeeded.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hadron.boot import disk, qemu, repart, secureboot, trusted, uki
from hadron.errors import HadronError
from hadron.image.build import BuiltImage

# Boot attempts systemd-boot gives a new version before it falls back to the previous one.
TRIES = 3
# Directories the read-only root must have for the system to mount on them at boot.
MOUNT_POINTS = ("dev", "proc", "sys", "run", "tmp", "var", "efi", "boot", "root", "home", "mnt", "srv")
# Space left after the partitions for the /var partition the first boot adds.
VAR_ROOM_MIB = 512
LOADER_CONF = "timeout 0\nconsole-mode keep\neditor no\n"  # no `default`: it would defeat boot counting
# Host programs this module runs (rows of hadron.host's table), and what the whole path needs.
HOST_TOOLS = ("mdir",)
HOST_NEEDS = (*trusted.HOST_NEEDS, *HOST_TOOLS)
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.~^-]*$")  # no '_' or '+': they delimit the UKI's name


@dataclass(frozen=True)
class ImmutableDisk:
    path: Path
    uki: uki.UkiInfo
    uki_name: str  # its path on the ESP
    image_id: str
    version: str
    roothash: str
    cmdline: str
    partitions: tuple[repart.RepartPartition, ...]
    size: int

    def layout(self) -> list[dict[str, object]]:
        return [{"partno": p.partno, "type": p.role, "label": p.label, "uuid": p.uuid, "offset": p.offset,
                 "bytes": p.size} for p in sorted(self.partitions, key=lambda p: p.partno)]


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise HadronError(f"version {version!r} is not usable in partition labels and UKI names",
                          hint="use letters, digits, '.', '~', '^' and '-' (no '_' or '+'), e.g. 1.2")
    return version


def os_release(tree: Path) -> dict[str, str]:
    out = {}
    for line in (tree / trusted.OS_RELEASE).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v.strip().strip('"')
    return out


def stamp_version(tree: Path, version: str) -> None:
    """Set IMAGE_VERSION in the tree's os-release (what sysupdate and the UKI's .osrel read)."""
    path = tree / trusted.OS_RELEASE
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("IMAGE_VERSION=")]
    path.unlink()  # may be a hard link into the image
    path.write_text("\n".join([*lines, f"IMAGE_VERSION={version}"]) + "\n")


def prepare_root(img: BuiltImage, tree: Path, *, version: str | None, check: bool, probe: str | None,
                 extra_files: Mapping[str, bytes] | None) -> None:
    """The root file system as the disk holds it: the image, its mount points, an empty /boot (the
    kernel is in the UKI), the version, and for a checked boot the check unit and ``extra_files``."""
    qemu.copy_tree(img.rootfs, tree)
    shutil.rmtree(tree / "boot", ignore_errors=True)
    for d in MOUNT_POINTS:
        (tree / d).mkdir(exist_ok=True)
    if version is not None:
        stamp_version(tree, version)
    if check:
        qemu.add_check_unit(tree, probe=probe)
    for rel, data in (extra_files or {}).items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)


def disk_seed(img: BuiltImage, version: str) -> str:
    """repart's seed for the UUIDs it does not derive from the root hash: per image and version, so
    that the signature partitions of two versions in the two slots never share a UUID."""
    return disk.stable_uuid(img.key, f"disk:{version}")


def make_slots(img: BuiltImage, keys: secureboot.KeySet, work: Path, raw: Path, *, log: Path, seed: str) -> \
        list[repart.RepartPartition]:
    """First repart run: slot A filled from work/root, slot B empty, the ESP deferred, /var left out.
    repart runs from work/root itself, so that its specifiers (%M, %A: the partition labels) read
    the version stamped there."""
    repart.check_image(img.rootfs, img.name)
    shutil.copyfile(keys.db.key, work / "db.key")
    (work / "db.key").chmod(0o600)
    shutil.copyfile(keys.db.crt, work / "db.crt")
    try:
        return repart.run(work / "root", work, raw, log=log, what="systemd-repart (root slots)", args=[
            "--empty=create", "--size=auto", f"--definitions={repart.SANDBOX_OUT}/repart.d",
            f"--copy-source={repart.SANDBOX_OUT}/root", f"--private-key={repart.SANDBOX_OUT}/db.key",
            f"--certificate={repart.SANDBOX_OUT}/db.crt", "--defer-partitions=esp", "--exclude-partitions=var",
            f"--seed={seed}"])
    finally:
        (work / "db.key").unlink(missing_ok=True)


def roothash_of(parts: list[repart.RepartPartition], image: str) -> str:
    hashes = {p.roothash for p in parts if p.role == "root" and p.roothash}
    if len(hashes) != 1:
        raise HadronError(f"systemd-repart made {len(hashes)} verity root hashes for image {image}, not one",
                          hint="the image's repart.d must define one root partition with Verity=data")
    return hashes.pop()


def make_esp(img: BuiltImage, keys: secureboot.KeySet, work: Path, efi: Path, uki_name: str, size_mib: int,
             epoch: int = 0) -> Path:
    bf = trusted.find_boot_files(img)
    sdboot = work / "systemd-bootx64.efi"
    secureboot.sign_efi(keys, bf.systemd_boot, sdboot, epoch=epoch)
    loader = work / "loader.conf"
    loader.write_text(LOADER_CONF)
    esp = work / "esp.img"
    disk.make_esp(esp, {"EFI/BOOT/BOOTX64.EFI": sdboot, "EFI/systemd/systemd-bootx64.efi": sdboot,
                        "loader/loader.conf": loader, uki_name: efi}, size_mib=size_mib, epoch=epoch)
    return esp


def add_esp(img: BuiltImage, work: Path, raw: Path, esp: Path, *, log: Path, seed: str) -> \
        list[repart.RepartPartition]:
    """Second repart run: the deferred ESP, copied from ``esp``; the disk grown by room for /var."""
    size = raw.stat().st_size + VAR_ROOM_MIB * disk.MIB
    repart.stage_definitions(img.rootfs / repart.DEFINITIONS, work,
                             {_esp_definition(img): f"CopyBlocks={repart.SANDBOX_OUT}/{esp.name}\n"})
    return repart.run(img.rootfs, work, raw, log=log, what="systemd-repart (ESP)", args=[
        f"--size={size}", f"--definitions={repart.SANDBOX_OUT}/repart.d", "--exclude-partitions=var",
        f"--seed={seed}"])


def _esp_definition(img: BuiltImage) -> str:
    for p in sorted((img.rootfs / repart.DEFINITIONS).glob("*.conf")):
        if re.search(r"^Type=esp\s*$", p.read_text(), re.M):
            return p.name
    raise HadronError(f"image {img.name} defines no ESP in /{repart.DEFINITIONS}", hint="add a Type=esp definition")


def _esp_size(img: BuiltImage) -> int:
    text = (img.rootfs / repart.DEFINITIONS / _esp_definition(img)).read_text()
    m = re.search(r"^SizeMinBytes=(\d+)M\s*$", text, re.M)
    if not m:
        raise HadronError(f"the ESP definition of image {img.name} has no SizeMinBytes=<N>M")
    return int(m.group(1))


def uki_file_name(image_id: str, version: str, tries: int | None = TRIES) -> str:
    return f"EFI/Linux/{image_id}_{version}" + (f"+{tries}" if tries is not None else "") + ".efi"


def cmdline_for(roothash: str, extra: str = "") -> str:
    # roothash= makes systemd's generators open the verity device /dev/mapper/root from the data and
    # hash partitions whose UUIDs are the hash's two halves and mount it read-only as the root.
    return f"roothash={roothash} rootfstype=erofs console=ttyS0 panic=-1 {extra}".strip()


@disk.standard_umask()
def build_immutable_disk(img: BuiltImage, keys: secureboot.KeySet, out: Path, *, log: Path,
                         version: str | None = None, check: bool = False, probe: str | None = None,
                         extra_files: Mapping[str, bytes] | None = None, cmdline_extra: str = "",
                         epoch: int = 0, roothash_override: str | None = None,
                         keep_uki: Path | None = None) -> ImmutableDisk:
    """Write the immutable disk to ``out``. ``roothash_override`` puts another root hash into the
    UKI than the one the slot has (a negative test: such a disk must not boot); ``keep_uki`` is
    where to keep a copy of the signed UKI."""
    if version is not None:
        check_version(version)
    trusted.find_boot_files(img)
    repart.check_image(img.rootfs, img.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hadron-immutable-", dir=out.parent) as td:
        work = Path(td)
        tree = work / "root"
        prepare_root(img, tree, version=version, check=check, probe=probe, extra_files=extra_files)
        rel = os_release(tree)
        image_id, ver = rel.get("IMAGE_ID", img.name), rel.get("IMAGE_VERSION", "0")
        check_version(ver)
        repart.stage_definitions(img.rootfs / repart.DEFINITIONS, work)
        raw = work / "disk.raw"
        seed = disk_seed(img, ver)
        parts = make_slots(img, keys, work, raw, log=log, seed=seed)
        roothash = roothash_of(parts, img.name)
        cmdline = cmdline_for(roothash_override or roothash, cmdline_extra)
        efi = work / "uki.efi"
        info = trusted.build_signed_uki(img, keys, efi, cmdline=cmdline, rootfs=tree, epoch=epoch)
        shutil.rmtree(tree)
        if keep_uki is not None:
            shutil.copyfile(efi, keep_uki)
        name = uki_file_name(image_id, ver)
        esp = make_esp(img, keys, work, efi, name, _esp_size(img), epoch)
        parts = [p for p in parts if p.role != "esp"] + [p for p in add_esp(img, work, raw, esp, log=log, seed=seed)
                                                        if p.role == "esp"]
        os.replace(raw, out)
    return ImmutableDisk(out, info, name, image_id, ver, roothash, cmdline, tuple(parts), out.stat().st_size)


# What the boot check's probe reports on the immutable disk (one "key value" line each): the root
# mount, a write attempt, dm-verity's view of the root, the command line, /var and how many boots
# it has seen, boot counting's state, and the booted version.
PROBE = r"""#!/bin/sh
mounted() { awk -v at="$1" '$2 == at { m = $1 " " $3 " " $4 } END { print m }' /proc/self/mounts; }
echo "root $(mounted /)"
if touch /usr/.hadron-write-test 2>/run/hadron-write; then echo "write allowed"
else echo "write $(cat /run/hadron-write)"; fi
veritysetup status root | awk -F': *' '/^ *(status|root hash|data device|hash device):/ {
  sub(/^ +/, "", $1); gsub(/ /, "-", $1); print "verity-" $1, $2 }'
echo "cmdline $(cat /proc/cmdline)"
echo "var $(mounted /var)"
echo "var-crypt $(cryptsetup status var | awk '$1 == "type:" { print $2 }') $(cryptsetup luksDump \
  /dev/disk/by-partlabel/hadron-var | awk '$2 == "systemd-tpm2" { n++ } END { print n + 0 }') tpm2 token(s)"
f=/var/lib/hadron-check/boots
mkdir -p /var/lib/hadron-check && cat /proc/sys/kernel/random/boot_id >> $f
echo "var-boots $(wc -l < $f)"
echo "bless $(/usr/lib/systemd/systemd-bless-boot status 2>&1)"
echo "version $(. /usr/lib/os-release; echo $IMAGE_VERSION)"
"""
# Console lines that end a boot that cannot come up (the initrd's emergency mode).
STUCK = (b"You are in emergency mode", b"Kernel panic")


def probe_values(res: qemu.BootResult) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in res.reported("PROBE"):
        key, _, value = line.partition(" ")
        out.setdefault(key, value.strip())
    return out


def esp_listing(path: Path, esp: repart.RepartPartition, directory: str = "EFI/Linux") -> list[str]:
    """File names in a directory of the disk's ESP, read with mtools from the disk file."""
    from hadron import runner

    res = runner.run(["mdir", "-b", "-i", f"{path}@@{esp.offset}", f"::/{directory}"], env={"MTOOLS_SKIP_CHECK": "1"},
                     what=f"listing /{directory} on the ESP of {path}")
    return sorted(Path(line.strip()).name for line in res.stdout.splitlines() if line.strip())


def flip_byte(path: Path, part: repart.RepartPartition, at: int) -> None:
    """Invert one byte ``at`` bytes into partition ``part`` of the disk file."""
    with open(path, "r+b") as f:
        f.seek(part.offset + at)
        b = f.read(1)
        f.seek(part.offset + at)
        f.write(bytes([b[0] ^ 0xFF]))


@dataclass
class Attempt:
    """One boot of the check and what it showed."""
    name: str
    expected: str  # "boots" or "refused"
    result: str  # "boots", "refused" or "wrong: …"
    seconds: float | None
    evidence: str

    @property
    def ok(self) -> bool:
        return self.result == self.expected

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "expected": self.expected, "result": self.result, "seconds": self.seconds,
                "evidence": self.evidence, "ok": self.ok}


@dataclass
class ImmutableCheck:
    disk: ImmutableDisk
    first: qemu.BootResult
    probe: dict[str, str]
    second_probe: dict[str, str]
    esp_before: list[str]
    esp_after: list[str]
    attempts: list[Attempt]
    problems: list[str]
    second_seconds: float | None = None

    @property
    def ok(self) -> bool:
        return self.first.ok and not self.problems and all(a.ok for a in self.attempts)


def judge_first_boot(d: ImmutableDisk, p: dict[str, str]) -> list[str]:
    """What the first boot's probe shows that is not what the immutable disk must be."""
    bad = []
    root = p.get("root", "").split()
    if len(root) < 3 or root[0] != "/dev/mapper/root" or root[1] != "erofs" or "ro" not in root[2].split(","):
        bad.append(f"/ is not the read-only erofs on /dev/mapper/root: {p.get('root')!r}")
    if "Read-only file system" not in p.get("write", ""):
        bad.append(f"a write to /usr did not fail with EROFS: {p.get('write')!r}")
    if p.get("verity-root-hash") != d.roothash:
        bad.append(f"veritysetup shows root hash {p.get('verity-root-hash')!r}, the UKI's command line {d.roothash}")
    if f"roothash={d.roothash}" not in p.get("cmdline", "").split():
        bad.append("the booted command line lacks the disk's roothash=")
    if p.get("var", "").split()[:2] != ["/dev/mapper/var", "ext4"]:
        bad.append(f"/var is not the ext4 volume made at first boot: {p.get('var')!r}")
    if p.get("var-crypt") != "LUKS2 1 tpm2 token(s)":
        bad.append(f"/var is not LUKS2 with one TPM2 token: {p.get('var-crypt')!r}")
    if p.get("version") != d.version:
        bad.append(f"booted version {p.get('version')!r}, the disk holds {d.version}")
    return bad


def check_immutable_boot(img: BuiltImage, keys: secureboot.KeySet, work: Path, *, timeout: float, echo: bool,
                         log: Path, cmdline_extra: str = "", epoch: int = 0) -> ImmutableCheck:
    """Boot the immutable disk under Secure Boot with a TPM twice, then two disks that must not boot:
    one whose UKI carries a root hash with one digit changed, one whose root partition has one byte
    flipped. Between boots the ESP is read from the disk file to see boot counting at work."""
    store = work / "OVMF_VARS.fd"
    secureboot.enroll_ovmf_vars(keys, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
    path = work / "disk.raw"

    def build(**kw: object) -> ImmutableDisk:
        return build_immutable_disk(img, keys, path, log=log, check=True, probe=PROBE, cmdline_extra=cmdline_extra,
                                    epoch=epoch, **kw)  # type: ignore[arg-type]

    def boot(stop: tuple[bytes, ...] | None = None) -> qemu.BootResult:
        return qemu.boot_disk(path, "secure-boot", vars_file=store, tpm=True, tpm_state=work / "tpm",
                              timeout=timeout, echo=echo, stop_on=(*STUCK, *stop) if stop is not None else ())

    d = build()
    esp = next(p for p in d.partitions if p.role == "esp")
    before = esp_listing(path, esp)
    first = boot()
    p1 = probe_values(first)
    problems = judge_first_boot(d, p1)
    after = esp_listing(path, esp)
    blessed = Path(uki_file_name(d.image_id, d.version, None)).name
    if after != [blessed]:
        problems.append(f"after a good boot the ESP holds {after}, not the blessed {blessed}")
    second = boot()
    p2 = probe_values(second)
    if not second.ok:
        problems.append(f"the second boot of the same disk failed: state {second.state}, failed {second.failed}")
    if p2.get("var-boots") != "2":
        problems.append(f"/var did not keep the first boot's file: it has seen {p2.get('var-boots')!r} boots")
    attempts = [Attempt("signed-uki-own-root", "boots", "boots" if first.ok else f"wrong: state {first.state}",
                        first.seconds_to_check, p1.get("root", ""))]
    bad = d.roothash[:-1] + ("0" if d.roothash[-1] != "0" else "1")
    build(roothash_override=bad)
    attempts.append(_refusal("uki-roothash-digit-changed", boot(()), "Timed out waiting for device"))
    d = build()
    root = next(p for p in d.partitions if p.role == "root" and p.roothash)
    flip_byte(path, root, 1024 + 8)  # in the erofs superblock, which the mount reads first
    attempts.append(_refusal("root-partition-byte-flipped", boot((b"is corrupted",)), "is corrupted"))
    return ImmutableCheck(d, first, p1, p2, before, after, attempts, problems, second.seconds_to_check)


def _refusal(name: str, res: qemu.BootResult, marker: str) -> Attempt:
    lines = [ln for ln in res.console.splitlines() if marker in ln]
    evidence = "; ".join(dict.fromkeys(re.sub(r"\x1b(\[[0-9;:?]*[A-Za-z]|.)|^\[ *[0-9.]+\] ", "", ln).strip()
                                       for ln in lines[:4]))
    if res.state is not None:
        result = f"wrong: it booted to state {res.state}"
    elif not lines:
        result = f"wrong: no multi-user.target, but no sign of '{marker}' either"
    else:
        result = "refused"
    return Attempt(name, "refused", result, res.seconds_total, evidence)
