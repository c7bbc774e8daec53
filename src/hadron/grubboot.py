"""The standard boot path: a GPT disk that boots with GRUB on BIOS and on UEFI, a dracut initramfs.

Steps, each small, every program taken from the image itself (run in a read-only sandbox whose
root is the image): generate the initramfs for the image's kernel with the image's dracut, make
GRUB's BIOS core image and its UEFI executable with the image's grub-mkimage (each with a
three-line early config that finds the root file system by UUID), write grub.cfg, make the ESP
and the ext4 root file system, write the GPT disk (BIOS boot partition, ESP, root) with sfdisk,
then embed GRUB's BIOS stage in the protective MBR and the BIOS boot partition with the image's
grub-bios-setup, working on the disk file.

The root file system is ext4: GRUB reads it natively (its ext2 module), the kernel has it built
in, the system is a writable single-root system today, and mkfs.ext4 -d fills it from a directory
without mounting anything. It is found by its file-system UUID both by GRUB (``search
--fs-uuid``) and by the initramfs (``root=UUID=``).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hadron import disk, qemu, sandbox
from hadron.errors import HadronError
from hadron.imagebuild import BuiltImage

ESP_MIB = 64
BIOS_BOOT_MIB = 1
GRUB_LIB = "usr/lib/grub"
PLATFORMS = ("i386-pc", "x86_64-efi")
# Modules built into the core images: enough to read the GPT disk and the ext4 root and find it
# by UUID. Everything else (normal, linux, ...) is loaded from /boot/grub/<platform> on the root.
CORE_MODULES = {
    "i386-pc": ["biosdisk", "part_gpt", "ext2", "search_fs_uuid"],
    "x86_64-efi": ["part_gpt", "ext2", "search_fs_uuid"],
}
# What dracut and GRUB's tools need in the image.
REQUIRED = {
    "dracut": "usr/bin/dracut",
    "grub-mkimage": "usr/bin/grub-mkimage",
    "grub-bios-setup": "usr/sbin/grub-bios-setup",
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


def find_kernel(img: BuiltImage) -> tuple[Path, str]:
    release = str(img.record.get("kernel_release") or "")
    kernel = img.rootfs / "boot" / f"vmlinuz-{release}"
    if not release or not kernel.is_file():
        raise HadronError(f"image {img.name} has no kernel (/boot/vmlinuz-<release>)",
                          hint="set `kernel = ...` in the image definition")
    return kernel, release


def check_grub_image(img: BuiltImage) -> tuple[Path, str]:
    """Everything the standard path needs from the image, or an error naming what is missing."""
    kernel, release = find_kernel(img)
    for what, rel in REQUIRED.items():
        if not (img.rootfs / rel).exists():
            raise HadronError(f"image {img.name} has no {what} (/{rel})",
                              hint="build an image that carries the grub boot path (boot = [\"grub\"], e.g. core-grub)")
    return kernel, release


def run_in_image(root: Path, argv: list[str], out: Path, log: Path, what: str) -> None:
    """Run one of the image's programs with the image as a read-only root; ``out`` is writable at /out."""
    env = sandbox.base_env(0, home="/tmp")
    env["PATH"] = "/usr/bin:/usr/sbin"
    step = sandbox.Step(argv=argv, mounts=[sandbox.Mount(out, "/out", writable=True)], env=env, cwd="/", root=root)
    with log.open("ab") as f:
        f.write(f"==> {what}: {' '.join(argv)}\n".encode())
        f.flush()
        status = sandbox.run(step, f)
    if status != 0:
        raise HadronError(f"{what} failed (exit status {status})", hint=f"see the log: {log}")


def make_initramfs(root: Path, release: str, out: Path, log: Path) -> Path:
    """dracut from the image, for the image's kernel, configured by the image's /etc/dracut.conf.d."""
    target = out / f"initramfs-{release}.img"
    run_in_image(root, ["dracut", "--force", "--kver", release, "--kmoddir", f"/usr/lib/modules/{release}",
                        "--tmpdir", "/tmp", f"/out/{target.name}"], out, log, "dracut")
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
    for platform, fmt, name in (("i386-pc", "i386-pc", "core.img"), ("x86_64-efi", "x86_64-efi", "BOOTX64.EFI")):
        run_in_image(root, ["grub-mkimage", "-O", fmt, "-d", f"/{GRUB_LIB}/{platform}", "-c", "/out/early.cfg",
                            "-p", "/boot/grub", "-o", f"/out/{name}", *CORE_MODULES[platform]],
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


def embed_bios_grub(root: Path, work: Path, log: Path) -> None:
    """grub-bios-setup on ``work``/disk.img: boot.img into the protective MBR's boot code, core.img
    into the BIOS boot partition (both made by make_grub_images in ``work``)."""
    (work / "device.map").write_text("(hd0) /out/disk.img\n")
    run_in_image(root, ["grub-bios-setup", "--directory=/out", "--device-map=/out/device.map",
                        "--skip-fs-probe", "/out/disk.img"], work, log, "grub-bios-setup")


def build_grub_disk(img: BuiltImage, out: Path, *, check: bool = False, cmdline_extra: str = "",
                    log: Path | None = None) -> GrubDisk:
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
        initramfs = make_initramfs(tree, release, work, log)
        shutil.move(initramfs, tree / "boot" / initramfs.name)
        images = make_grub_images(tree, fs_uuid, work, log)
        install_grub_tree(tree, grub_cfg(f"Hadron {img.name} {version}", release, fs_uuid, cmdline_extra))
        esp = work / "esp.img"
        disk.make_esp(esp, {"EFI/BOOT/BOOTX64.EFI": images["x86_64-efi"]}, size_mib=ESP_MIB)
        rootimg = work / "root.img"
        root_mib = disk.make_root_fs(tree, rootimg, label="hadron-root", fs_uuid=fs_uuid)
        disk_path = work / "disk.img"
        disk.make_gpt_disk(disk_path, [
            disk.Partition("bios-boot", disk.BIOS_BOOT_TYPE, disk.stable_uuid(img.key, "bios-boot"), BIOS_BOOT_MIB),
            disk.Partition("esp", disk.ESP_TYPE, disk.stable_uuid(img.key, "esp"), ESP_MIB, esp),
            disk.Partition("root-x86-64", disk.ROOT_X86_64_TYPE, disk.stable_uuid(img.key, "root-partition"),
                           root_mib, rootimg),
        ], disk_uuid=disk.stable_uuid(img.key, "disk"))
        embed_bios_grub(tree, work, log)
        initramfs_size = (tree / "boot" / initramfs.name).stat().st_size
        shutil.rmtree(tree)
        disk_path.replace(out)
    return GrubDisk(out, fs_uuid, release, initramfs_size, out.stat().st_size)
