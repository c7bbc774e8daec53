"""Bootable artifacts made from a built image: the signed Unified Kernel Image and the trusted disk.

Steps, each small: find the image's boot files (kernel, systemd-stub, systemd-boot, os-release),
assemble the UKI (uki.build_uki, with the PCR 11 policy signed by measure), sign systemd-boot and
the UKI for Secure Boot (secureboot.sign_efi, sbsign), make the EFI system partition and the root
file system, write the GPT disk. Every input is checked before anything is written.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hadron.boot import disk, initrd, measure, qemu, secureboot, uki, unseal
from hadron.errors import HadronError
from hadron.image.build import BuiltImage, find_kernel

STUB = "usr/lib/systemd/boot/efi/linuxx64.efi.stub"
SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
OS_RELEASE = "usr/lib/os-release"
ESP_MIB = 64
# Host programs and firmware this path needs (rows of hadron.host's table): the initrd archive, the
# signatures, the disk steps; QEMU with OVMF's Secure Boot build and swtpm.
HOST_TOOLS = initrd.HOST_TOOLS
HOST_NEEDS = (*HOST_TOOLS, *secureboot.HOST_TOOLS, *disk.HOST_TOOLS, *qemu.HOST_TOOLS,
              *qemu.FIRMWARE_FILES["secure-boot"])
# The root file system's partition name and label; systemd's discoverable-partitions type for x86-64.
ROOT_NAME = "root-x86-64"


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    release: str
    stub: Path
    systemd_boot: Path
    os_release: Path


@dataclass(frozen=True)
class TrustedDisk:
    path: Path
    uki: uki.UkiInfo
    root_partuuid: str
    size: int


def find_boot_files(img: BuiltImage) -> BootFiles:
    """The files the trusted path needs from the image, or a clear error naming what is missing."""
    kernel, release = find_kernel(img)
    files = {"stub": img.rootfs / STUB, "systemd_boot": img.rootfs / SYSTEMD_BOOT,
             "os_release": img.rootfs / OS_RELEASE}
    for what, p in files.items():
        if not p.is_file():
            raise HadronError(f"image {img.name} has no {what.replace('_', '-')} (/{p.relative_to(img.rootfs)})",
                              hint="the systemd recipe must build with bootloader = \"enabled\"")
    return BootFiles(kernel, release, files["stub"], files["systemd_boot"], files["os_release"])


# The policy is signed for systemd's standard phase paths: systemd-pcrphase extends PCR 11 with
# enter-initrd, leave-initrd, sysinit and ready as the boot goes (a system without the TPM2 user space
# would stay at the stub's value, which is not signed).
SIGNED_PHASES = measure.DEFAULT_PHASES
# The phase path a system that reached multi-user.target is in.
BOOTED_PHASE = "enter-initrd:leave-initrd:sysinit:ready"


def expected_booted_pcr11(info: uki.UkiInfo) -> str:
    """PCR 11 (sha256, hex) a booted system should read: the stub's measurements, then the phases."""
    for entry in info.pcr11["sha256"]:
        if entry.get("phase") == BOOTED_PHASE:
            return str(entry["hash"])
    raise HadronError(f"the UKI's PCR 11 prediction has no entry for the phase path {BOOTED_PHASE}")


# Left out of the initrd: the kernel itself and the boot loader binaries; the host system's mounts,
# encrypted volumes and partition definitions (in the initrd, /etc/fstab and /etc/crypttab would be
# set up there, and systemd-repart would look for the root disk before the root is mounted).
INITRD_EXCLUDE = ("boot", "usr/lib/systemd/boot", "etc/fstab", "etc/crypttab", "usr/lib/repart.d")


def build_initrd(img: BuiltImage, out: Path, *, epoch: int = 0, rootfs: Path | None = None) -> int:
    """A systemd initrd made from the image itself (the approach mkosi takes, not dracut's): the rootfs
    without /boot, plus /etc/initrd-release (which makes systemd run initrd.target, mount root= at
    /sysroot and switch root) and /init, packed reproducibly (:func:`hadron.boot.initrd.pack`).
    Returns the size in bytes. ``rootfs`` is a tree made from the image to use instead of its rootfs."""
    src = rootfs or img.rootfs
    with tempfile.TemporaryDirectory(prefix="hadron-initrd-", dir=out.parent) as td:
        tree = Path(td) / "root"
        qemu.copy_tree(src, tree)
        for rel in INITRD_EXCLUDE:
            if (tree / rel).is_dir() and not (tree / rel).is_symlink():
                shutil.rmtree(tree / rel)
            else:
                (tree / rel).unlink(missing_ok=True)
        osrel = (src / OS_RELEASE).read_text()
        (tree / "etc/initrd-release").write_text(osrel.rstrip("\n") + '\nVARIANT="initrd"\nVARIANT_ID=initrd\n')
        (tree / "init").symlink_to("usr/lib/systemd/systemd")
        initrd.pack(tree, out, epoch=epoch)
    return out.stat().st_size


def policy_covers(info: uki.UkiInfo, pcr11_hex: str, pcr_public_key: Path) -> bool:
    """Whether the UKI's signed .pcrsig authorizes a PolicyPCR session for this PCR 11 value; its
    signatures are verified against the PCR public key (the UKI's .pcrpkey) first."""
    if info.pcrsig is None:
        raise HadronError("the UKI has no .pcrsig")
    measure.verify_policy_signature(info.pcrsig, pcr_public_key)
    wanted = measure.policy_digest(bytes.fromhex(pcr11_hex)).hex()
    return any(entry["pol"] == wanted and not entry.get("ref") for entry in info.pcrsig.get("sha256", []))


def root_partuuid(img: BuiltImage) -> str:
    return disk.stable_uuid(img.key, "root-partition")


def kernel_cmdline(img: BuiltImage, extra: str = "") -> str:
    # root= by GPT partition UUID: the initrd's systemd mounts it (the cloud kernel could do it alone).
    return f"root=PARTUUID={root_partuuid(img)} rootfstype=ext4 rw console=ttyS0 panic=-1 {extra}".strip()


@disk.standard_umask()
def build_signed_uki(img: BuiltImage, keys: secureboot.KeySet, out: Path, *, cmdline_extra: str = "",
                     pcr_phases: tuple[str, ...] | None = None, epoch: int = 0, cmdline: str | None = None,
                     rootfs: Path | None = None) -> uki.UkiInfo:
    """The image's UKI with a signed PCR 11 policy, then signed with the db key for Secure Boot.
    ``cmdline`` replaces the writable root's command line; ``rootfs`` (a tree made from the image)
    gives the initrd and the os-release instead of the image's rootfs."""
    bf = find_boot_files(img)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hadron-uki-", dir=out.parent) as td:
        unsigned = Path(td) / "unsigned.efi"
        initrd = Path(td) / "initrd.cpio.zst"
        build_initrd(img, initrd, epoch=epoch, rootfs=rootfs)
        osrel = (rootfs / OS_RELEASE).read_bytes() if rootfs else bf.os_release.read_bytes()
        info = uki.build_uki(
            bf.stub, unsigned, linux=bf.kernel, osrel=osrel,
            cmdline=cmdline if cmdline is not None else kernel_cmdline(img, cmdline_extra), initrd=initrd,
            uname=bf.release,
            sbat=None, pcr_private_key=keys.pcr_private_key, pcr_public_key=keys.pcr_public_key,
            pcr_phases=pcr_phases or SIGNED_PHASES,
        )
        secureboot.sign_efi(keys, unsigned, out, epoch=epoch)
    return info


@disk.standard_umask()
def build_trusted_disk(img: BuiltImage, keys: secureboot.KeySet, out: Path, *, check: bool = False,
                       cmdline_extra: str = "", pcr_phases: tuple[str, ...] | None = None,
                       epoch: int = 0, probe: str | None = None,
                       extra_files: Mapping[str, bytes] | None = None) -> TrustedDisk:
    """GPT disk: an ESP with signed systemd-boot, loader.conf and the signed UKI; the root file system.

    ``check`` adds the boot-check unit to the root file system (qemu.CHECK_UNIT) with ``probe`` as
    its probe script, and ``extra_files`` (path in the root → content) to the root."""
    bf = find_boot_files(img)
    version = str(img.record.get("version", "0"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hadron-disk-", dir=out.parent) as td:
        work = Path(td)
        efi = work / "uki.efi"
        info = build_signed_uki(img, keys, efi, cmdline_extra=cmdline_extra, pcr_phases=pcr_phases, epoch=epoch)
        sdboot = work / "systemd-bootx64.efi"
        secureboot.sign_efi(keys, bf.systemd_boot, sdboot, epoch=epoch)
        loader = work / "loader.conf"
        loader.write_text("timeout 0\nconsole-mode keep\neditor no\n")
        esp = work / "esp.img"
        disk.make_esp(esp, {
            "EFI/BOOT/BOOTX64.EFI": sdboot,
            "EFI/systemd/systemd-bootx64.efi": sdboot,
            "loader/loader.conf": loader,
            f"EFI/Linux/{img.name}-{version}.efi": efi,
        }, size_mib=ESP_MIB, epoch=epoch)
        tree = img.rootfs
        if check:
            tree = work / "root"
            qemu.copy_tree(img.rootfs, tree)
            qemu.add_check_unit(tree, probe=probe)
            for rel, data in (extra_files or {}).items():
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                (tree / rel).write_bytes(data)
        rootimg = work / "root.img"
        root_mib = disk.make_root_fs(tree, rootimg, label="hadron-root", fs_uuid=disk.stable_uuid(img.key, "root-fs"),
                                     tools=img.rootfs, epoch=epoch)
        if check:
            shutil.rmtree(tree)
        puuid = root_partuuid(img)
        disk.make_gpt_disk(out, [
            disk.Partition("esp", disk.ESP_TYPE, disk.stable_uuid(img.key, "esp"), ESP_MIB, esp),
            disk.Partition(ROOT_NAME, disk.ROOT_X86_64_TYPE, puuid, root_mib, rootimg),
        ], disk_uuid=disk.stable_uuid(img.key, "disk"))
    return TrustedDisk(out, info, puuid, out.stat().st_size)


@dataclass
class TrustedCheck:
    """A checked trusted boot: the first boot's result, what PCR 11 should be, whether the signed
    policy covers what was read, and the unseal matrix."""
    boot: qemu.BootResult
    disk: TrustedDisk
    pcr11_expected: str
    pcr11_policy_signed: bool
    matrix: unseal.Matrix

    @property
    def ok(self) -> bool:
        return (self.boot.ok and self.boot.pcr11 == self.pcr11_expected and self.pcr11_policy_signed
                and self.matrix.ok)


def check_trusted_boot(img: BuiltImage, keys: secureboot.KeySet, work: Path, *, timeout: float,
                       echo: bool, cmdline_extra: str = "", epoch: int = 0) -> TrustedCheck:
    """Boot the trusted disk under Secure Boot with a TPM and run the unseal matrix (unseal module):
    the first boot checks the system and PCR 11 and seals a secret; three more boots (a renewed
    UKI, a UKI whose policy another key signed, no TPM) try to unseal it. One TPM state throughout."""
    store = work / "OVMF_VARS.fd"
    secureboot.enroll_ovmf_vars(keys, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
    tpm_state = work / "tpm"
    shutil.rmtree(tpm_state, ignore_errors=True)
    disks: list[TrustedDisk] = []

    def boot(probe: str, files: dict[str, bytes], ks: secureboot.KeySet, extra: str, tpm: bool) -> qemu.BootResult:
        path = work / "disk.raw"
        d = build_trusted_disk(img, ks, path, check=True, cmdline_extra=f"{cmdline_extra} {extra}".strip(),
                               epoch=epoch, probe=probe, extra_files=files)
        disks.append(d)
        return qemu.boot_disk(path, "secure-boot", vars_file=store, tpm=tpm, tpm_state=tpm_state,
                              timeout=timeout, echo=echo)

    secret = unseal.new_secret()
    first = boot(unseal.seal_probe(), {unseal.SECRET: secret.encode()}, keys, "", True)
    main = disks[0]
    expected = expected_booted_pcr11(main.uki)
    signed = first.pcr11 is not None and policy_covers(main.uki, first.pcr11, keys.pcr_public_key)
    try:
        credential = unseal.sealed_credential(first)
    except HadronError as e:
        matrix = unseal.Matrix([unseal.parse_case(first, "signed-boot", secret)]
                               + [unseal.Case(n, x, "missing", str(e)) for n, x in unseal.EXPECTED.items()
                                  if n != "signed-boot"], {"signed": first.seconds_to_check or 0.0})
    else:
        matrix = unseal.later_boots(boot, keys, work, secret, credential, first)
    return TrustedCheck(first, main, expected, signed, matrix)
