"""The standard (GRUB) boot path's pieces that need no real image: the GRUB configuration, and the
errors that must come before anything is written."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hadron.boot import disk
from hadron.boot import grub as grubboot
from hadron.errors import HadronError
from hadron.image.build import BuiltImage

ROOT = Path(__file__).resolve().parents[1]


def fake_image(tmp_path: Path, *, kernel: bool = True, tools: bool = True) -> BuiltImage:
    path = tmp_path / "img"
    root = path / "rootfs"
    (root / "boot").mkdir(parents=True)
    if kernel:
        (root / "boot/vmlinuz-7.2.8-cloud").write_bytes(b"kernel")
    if tools:
        for rel in grubboot.REQUIRED.values():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"")
    return BuiltImage("core-grub", "k" * 64, path, {"version": "0.1", "kernel_release": "7.2.8-cloud"}, cached=True)


def test_grub_cfg_boots_the_kernel_with_root_by_uuid() -> None:
    cfg = grubboot.grub_cfg("Hadron core-grub 0.1", "7.2.8-cloud", "1234-uuid", "quiet")
    assert "linux /boot/vmlinuz-7.2.8-cloud root=UUID=1234-uuid rootfstype=ext4 rw console=ttyS0" in cfg
    assert cfg.rstrip().endswith("}") and "quiet" in cfg
    assert "initrd /boot/initramfs-7.2.8-cloud.img" in cfg
    assert "terminal_output serial console" in cfg
    early = grubboot.early_config("1234-uuid")
    assert early == "search --no-floppy --fs-uuid --set=root 1234-uuid\nset prefix=($root)/boot/grub\n"
    # Every module the early config uses is in both core images.
    for mods in grubboot.CORE_MODULES.values():
        assert {"part_gpt", "ext2", "search"} <= set(mods)
    assert "biosdisk" in grubboot.CORE_MODULES["i386-pc"]


def test_image_without_kernel_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    with pytest.raises(HadronError, match="has no kernel"):
        grubboot.build_grub_disk(fake_image(tmp_path, kernel=False), out)
    assert not out.exists() and not out.with_suffix(".log").exists()


def test_image_without_grub_and_dracut_is_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "disk.raw"
    with pytest.raises(HadronError, match="has no dracut") as e:
        grubboot.build_grub_disk(fake_image(tmp_path, tools=False), out)
    assert "core-grub" in (e.value.hint or "")
    assert not out.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["image", "disk", "core", "--boot", "grub"], "image core does not carry the grub boot path"),
    (["boot", "core", "--grub", "bios"], "image core does not carry the grub boot path"),
    (["boot", "core-grub", "--grub", "bios", "--trusted"], "--trusted, --grub and --immutable are different disks"),
])
def test_cli_refuses_a_boot_path_before_building(args: list[str], message: str) -> None:
    res = subprocess.run([sys.executable, "-m", "hadron", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    if "carry" in message:
        assert "core-grub" in res.stderr  # the hint names the images that do


def _fake_core(sectors: int) -> bytes:
    core = bytearray(os.urandom(sectors * 512 - 100))  # not a whole number of sectors
    # grub-mkimage leaves one load-list entry (and a terminator below it) at the end of sector 0.
    grubboot.BLOCKLIST_ENTRY.pack_into(core, 500, 1, sectors - 1, 0x820)
    grubboot.BLOCKLIST_ENTRY.pack_into(core, 488, 0, 0, 0)
    struct.pack_into("<H", core, grubboot.NO_RS_LENGTH, 0x1234)
    return bytes(core)


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk")
def test_embed_bios_grub_writes_what_grub_bios_setup_would(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    disk.make_gpt_disk(img, [
        disk.Partition("bios-boot", disk.BIOS_BOOT_TYPE, disk.stable_uuid("t", "b"), 1),
        disk.Partition("root", disk.ROOT_X86_64_TYPE, disk.stable_uuid("t", "r"), 2),
    ], disk_uuid=disk.stable_uuid("t", "d"))
    before = img.read_bytes()
    bios = disk.partition_table(img)[0]
    # GPT's BIOS boot partition type ("Hah!IdontNeedEFI"), as sfdisk reads it back.
    assert bios.type_guid == "21686148-6449-6E6F-744E-656564454649" and bios.start == 2048 and bios.sectors == 2048
    boot = bytearray(os.urandom(512))
    boot[0x1FE:0x200] = b"\x55\xaa"
    core = _fake_core(40)
    grubboot.embed_bios_grub(img, bytes(boot), core, bios.start, bios.sectors)
    after = img.read_bytes()
    mbr = after[:512]
    assert mbr[0x1FE:0x200] == b"\x55\xaa"
    assert mbr[0x1B8:0x1FE] == before[0x1B8:0x1FE]  # protective MBR partition table kept
    assert mbr[3:0x5A] == before[3:0x5A]
    assert mbr[:3] == boot[:3] and mbr[0x68:0x1B8] == boot[0x68:0x1B8]  # boot code is boot.img's
    assert struct.unpack_from("<Q", mbr, 0x5C)[0] == 2048 and mbr[0x64] == 0xFF
    assert mbr[0x66:0x68] == b"\x90\x90"
    written = after[2048 * 512:(2048 + 40) * 512]
    assert grubboot.BLOCKLIST_ENTRY.unpack_from(written, 500) == (2049, 39, 0x820)
    assert grubboot.BLOCKLIST_ENTRY.unpack_from(written, 488) == (0, 0, 0)
    assert written[:488] == core[:488] and written[512:len(core)] == core[512:]
    assert written[len(core):] == bytes(40 * 512 - len(core))  # padded with zeros
    assert after[512:2048 * 512] == before[512:2048 * 512]  # GPT untouched
    assert after[(2048 + 40) * 512:] == before[(2048 + 40) * 512:]


def test_embed_bios_grub_refuses_what_cannot_boot(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    img.write_bytes(bytes(4 << 20))
    boot = bytes(512)
    with pytest.raises(HadronError, match="does not fit the BIOS boot partition"):
        grubboot.embed_bios_grub(img, boot, _fake_core(40), 2048, 20)
    with pytest.raises(HadronError, match="not one sector"):
        grubboot.embed_bios_grub(img, boot + b"x", _fake_core(4), 2048, 2048)
    bad = bytearray(_fake_core(4))
    struct.pack_into("<H", bad, grubboot.NO_RS_LENGTH, 0xFFFF)
    with pytest.raises(HadronError, match="not an i386-pc core image"):
        grubboot.embed_bios_grub(img, boot, bytes(bad), 2048, 2048)
    assert img.read_bytes() == bytes(4 << 20)
