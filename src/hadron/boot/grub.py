"""The standard boot path: a GPT disk that boots with GRUB on BIOS and on UEFI, a dracut initramfs.

Steps, each small, every program taken from the image itself (run in a read-only sandbox whose
root is the image): generate the initramfs for the image's kernel with the image's dracut, make
GRUB's BIOS core image and its UEFI executable with the image's grub-mkimage (each with a
three-line early config that finds the root file system by UUID), write grub.cfg, make the ESP
and the ext4 root file system, write the GPT disk (BIOS boot partition, ESP, root) with sfdisk,
then embed GRUB's BIOS stage in the protective MBR and the BIOS boot partition (embed_bios_grub,
what grub-bios-setup does, on the disk file).

The root file system is ext4: GRUB reads it natively (its ext2 module), the kernel has it built
in, the system is a writable single-root system today, and mkfs.ext4 -d fills it from a directory
without mounting anything. It is found by its file-system UUID both by GRUB (``search
--fs-uuid``) and by the initramfs (``root=UUID=``).
"""

from __future__ import annotations

import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hadron.boot import disk, initrd, qemu
from hadron.engine import sandbox
from hadron.errors import HadronError
from hadron.image.build import BuiltImage, find_kernel

# Host programs and firmware this path needs (rows of hadron.host's table): dracut and GRUB's tools
# run from the image in the sandbox; the disk steps; QEMU with SeaBIOS and OVMF.
HOST_NEEDS = (*sandbox.HOST_TOOLS, *disk.HOST_TOOLS, *initrd.HOST_TOOLS, *qemu.HOST_TOOLS, *qemu.FIRMWARE_FILES["bios"],
              *qemu.FIRMWARE_FILES["uefi"])
ESP_MIB = 64
BIOS_BOOT_MIB = 1
GRUB_LIB = "usr/lib/grub"
PLATFORMS = ("i386-pc", "x86_64-efi")
# Modules built into the core images: enough to read the GPT disk and the ext4 root and find it
# by UUID. Everything else (normal, linux, ...) is loaded from /boot/grub/<platform> on the root.
CORE_MODULES = {
    "i386-pc": ["biosdisk", "part_gpt", "ext2", "search"],
    "x86_64-efi": ["part_gpt", "ext2", "search"],
}
# What dracut and GRUB's tools need in the image.
REQUIRED = {
    "dracut": "usr/bin/dracut",
    "grub-mkimage": "usr/bin/grub-mkimage",
    "GRUB's BIOS boot sector": f"{GRUB_LIB}/i386-pc/boot.img",
    "GRUB's i386-pc modules": f"{GRUB_LIB}/i386-pc/kernel.img",
    "GRUB's x86_64-efi modules": f"{GRUB_LIB}/x86_64-efi/kernel.img",
}


@dataclass(frozen=True)
class GrubDisk:
    path: Path
    root_fs_uuid: str
    kernel_release: str
    initramfs_size: int
    size: int


def check_grub_image(img: BuiltImage) -> tuple[Path, str]:
    """Everything the standard path needs from the image, or an error naming what is missing."""
    kernel, release = find_kernel(img)
    for what, rel in REQUIRED.items():
        if not (img.rootfs / rel).exists():
            raise HadronError(f"image {img.name} has no {what} (/{rel})",
                              hint="build an image that carries the grub boot path (boot = [\"grub\"], e.g. core-grub)")
    return kernel, release


def run_in_image(root: Path, argv: list[str], out: Path, log: Path, what: str,
                 env_extra: dict[str, str | None] | None = None) -> None:
    """Run one of the image's programs with the image as a read-only root; ``out`` is writable at
    /tmp/out. ``env_extra`` adds variables, or removes those given as None."""
    env = sandbox.base_env(0, home="/tmp")
    env["PATH"] = "/usr/bin:/usr/sbin"
    for k, v in (env_extra or {}).items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    step = sandbox.Step(argv=argv, mounts=[sandbox.Mount(out, "/tmp/out", writable=True)], env=env, cwd="/", root=root)
    with log.open("ab") as f:
        f.write(f"==> {what}: {' '.join(argv)}\n".encode())
        f.flush()
        status = sandbox.run(step, f)
    if status != 0:
        raise HadronError(f"{what} failed (exit status {status})", hint=f"see the log: {log}")


# musl has no ld.so.cache, so no ldconfig. SOURCE_DATE_EPOCH would make dracut clamp file times
# with `find -newermt`, which busybox's find lacks, and busybox's cpio has no --reproducible: dracut
# decides what the initramfs holds, and the archive is then repacked reproducibly (initrd.repack).
DRACUT_ENV: dict[str, str | None] = {"DRACUT_LDCONFIG": "true", "SOURCE_DATE_EPOCH": None}


def make_initramfs(root: Path, release: str, out: Path, log: Path, *, epoch: int = 0) -> Path:
    """dracut from the image, for the image's kernel, configured by the image's /etc/dracut.conf.d;
    the archive repacked with times set to ``epoch``."""
    target = out / f"initramfs-{release}.img"
    run_in_image(root, ["dracut", "--force", "--kver", release,
                        "--kmoddir", f"/usr/lib/modules/{release}", "--tmpdir", "/tmp", f"/tmp/out/{target.name}"],
                 out, log, "dracut", DRACUT_ENV)
    initrd.repack(target, epoch=epoch)
    return target


def early_config(fs_uuid: str) -> str:
    return f"search --no-floppy --fs-uuid --set=root {fs_uuid}\nset prefix=($root)/boot/grub\n"


def grub_cfg(title: str, release: str, fs_uuid: str, extra: str = "") -> str:
    cmdline = f"root=UUID={fs_uuid} rootfstype=ext4 rw console=ttyS0 panic=-1 {extra}".strip()
    return (
        "serial --unit=0 --speed=115200\n"
        "terminal_input serial console\n"
        "terminal_output serial console\n"
        "set timeout=1\n"
        "set default=0\n"
        f"menuentry '{title}' {{\n"
        f"  linux /boot/vmlinuz-{release} {cmdline}\n"
        f"  initrd /boot/initramfs-{release}.img\n"
        "}\n"
    )


def make_grub_images(root: Path, fs_uuid: str, out: Path, log: Path) -> dict[str, Path]:
    """core.img (BIOS, with the image's boot.img next to it) and BOOTX64.EFI, by grub-mkimage."""
    (out / "early.cfg").write_text(early_config(fs_uuid))
    made = {}
    for platform, name in (("i386-pc", "core.img"), ("x86_64-efi", "BOOTX64.EFI")):
        run_in_image(root, ["grub-mkimage", "-O", platform, "-d", f"/{GRUB_LIB}/{platform}", "-c", "/tmp/out/early.cfg",
                            "-p", "/boot/grub", "-o", f"/tmp/out/{name}", *CORE_MODULES[platform]],
                     out, log, f"grub-mkimage {platform}")
        made[platform] = out / name
    shutil.copy2(root / GRUB_LIB / "i386-pc" / "boot.img", out / "boot.img")
    return made


def install_grub_tree(tree: Path, cfg: str) -> None:
    """/boot/grub on the root file system: grub.cfg and each platform's loadable modules."""
    grub = tree / "boot" / "grub"
    grub.mkdir(parents=True, exist_ok=True)
    for platform in PLATFORMS:
        src = tree / GRUB_LIB / platform
        dst = grub / platform
        dst.mkdir(exist_ok=True)
        for f in src.iterdir():
            if f.suffix in (".mod", ".lst"):
                shutil.copy2(f, dst / f.name)
    (grub / "grub.cfg").write_text(cfg)


# GRUB's i386-pc boot sector (include/grub/i386/pc/boot.h) and core image layout (offsets.h).
BPB = slice(0x03, 0x5A)            # a DOS BIOS parameter block: kept from the disk
KERNEL_SECTOR = 0x5C               # u64 LBA of core.img's first sector
BOOT_DRIVE = 0x64                  # 0xff: use the drive the BIOS booted from
DRIVE_CHECK = 0x66                 # a jump for floppies; NOPs on hard disks
PARTITION_TABLE = slice(0x1B8, 0x1FE)  # disk signature and MBR partition table: kept from the disk
BLOCKLIST_END = 512                # core.img's first sector ends with its load list, growing down
BLOCKLIST_ENTRY = struct.Struct("<QHH")  # start LBA, sectors, load segment
FIRST_SEGMENT = 0x800 + (512 >> 4)  # GRUB_BOOT_I386_PC_KERNEL_SEG plus the first sector
NO_RS_LENGTH = 512 + 0x14          # u16 in core.img; 0xffff means an incompatible core.img
MAX_CORE_SECTORS = (0x78000 - 0x9000) // 512


def embed_bios_grub(disk_path: Path, boot_img: bytes, core_img: bytes, part_lba: int, part_sectors: int) -> None:
    """What grub-bios-setup does for a GPT disk with a BIOS boot partition, on a disk file: core.img
    into the partition (its first sector's load list naming the rest), boot.img into the protective
    MBR's boot code, pointing at core.img. (grub-bios-setup itself wants the block device holding
    its own directory, so it cannot work on a plain file.) No Reed-Solomon codes are added: the
    partition is GRUB's alone."""
    if len(boot_img) != 512:
        raise HadronError(f"boot.img is {len(boot_img)} bytes, not one sector")
    nsec = -(-len(core_img) // 512)
    if nsec > min(part_sectors, MAX_CORE_SECTORS):
        raise HadronError(f"core.img ({nsec} sectors) does not fit the BIOS boot partition ({part_sectors} sectors)")
    core = bytearray(core_img.ljust(nsec * 512, b"\0"))
    if struct.unpack_from("<H", core, NO_RS_LENGTH)[0] == 0xFFFF:
        raise HadronError("core.img is not an i386-pc core image of this GRUB version")
    off = BLOCKLIST_END - BLOCKLIST_ENTRY.size
    while off > 0 and BLOCKLIST_ENTRY.unpack_from(core, off)[1] != 0:
        core[off:off + BLOCKLIST_ENTRY.size] = bytes(BLOCKLIST_ENTRY.size)
        off -= BLOCKLIST_ENTRY.size
    first = BLOCKLIST_END - BLOCKLIST_ENTRY.size
    BLOCKLIST_ENTRY.pack_into(core, first, part_lba + 1, nsec - 1, FIRST_SEGMENT)
    BLOCKLIST_ENTRY.pack_into(core, first - BLOCKLIST_ENTRY.size, 0, 0, 0)
    with disk_path.open("r+b") as f:
        mbr = f.read(512)
        boot = bytearray(boot_img)
        boot[BPB] = mbr[BPB]
        boot[DRIVE_CHECK:DRIVE_CHECK + 2] = b"\x90\x90"
        boot[PARTITION_TABLE] = mbr[PARTITION_TABLE]
        struct.pack_into("<Q", boot, KERNEL_SECTOR, part_lba)
        boot[BOOT_DRIVE] = 0xFF
        f.seek(part_lba * 512)
        f.write(core)
        f.seek(0)
        f.write(boot)


@disk.standard_umask()
def build_grub_disk(img: BuiltImage, out: Path, *, check: bool = False, cmdline_extra: str = "",
                    log: Path | None = None, epoch: int = 0) -> GrubDisk:
    """The standard-path disk image; ``check`` adds the boot-check unit (qemu.CHECK_UNIT)."""
    _, release = check_grub_image(img)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = log or out.with_suffix(".log")
    log.write_text("")
    fs_uuid = disk.stable_uuid(img.key, "root-fs")
    version = str(img.record.get("version", "0"))
    with tempfile.TemporaryDirectory(prefix="hadron-grub-", dir=out.parent) as td:
        work = Path(td)
        tree = work / "root"
        qemu.copy_tree(img.rootfs, tree)
        if check:
            qemu.add_check_unit(tree)
        initramfs = make_initramfs(tree, release, work, log, epoch=epoch)
        shutil.move(initramfs, tree / "boot" / initramfs.name)
        images = make_grub_images(tree, fs_uuid, work, log)
        install_grub_tree(tree, grub_cfg(f"Hadron {img.name} {version}", release, fs_uuid, cmdline_extra))
        esp = work / "esp.img"
        disk.make_esp(esp, {"EFI/BOOT/BOOTX64.EFI": images["x86_64-efi"]}, size_mib=ESP_MIB, epoch=epoch)
        rootimg = work / "root.img"
        root_mib = disk.make_root_fs(tree, rootimg, label="hadron-root", fs_uuid=fs_uuid, tools=img.rootfs,
                                     epoch=epoch)
        disk_path = work / "disk.img"
        disk.make_gpt_disk(disk_path, [
            disk.Partition("bios-boot", disk.BIOS_BOOT_TYPE, disk.stable_uuid(img.key, "bios-boot"), BIOS_BOOT_MIB),
            disk.Partition("esp", disk.ESP_TYPE, disk.stable_uuid(img.key, "esp"), ESP_MIB, esp),
            disk.Partition("root-x86-64", disk.ROOT_X86_64_TYPE, disk.stable_uuid(img.key, "root-partition"),
                           root_mib, rootimg),
        ], disk_uuid=disk.stable_uuid(img.key, "disk"))
        bios = disk.partition_table(disk_path)[0]
        embed_bios_grub(disk_path, (work / "boot.img").read_bytes(), images["i386-pc"].read_bytes(),
                        bios.start, bios.sectors)
        initramfs_size = (tree / "boot" / initramfs.name).stat().st_size
        shutil.rmtree(tree)
        disk_path.replace(out)
    return GrubDisk(out, fs_uuid, release, initramfs_size, out.stat().st_size)
