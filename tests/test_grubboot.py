"""The standard (GRUB) boot path's pieces that need no real image: the GRUB configuration, and the
errors that must come before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hadron import grubboot
from hadron.errors import HadronError
from hadron.imagebuild import BuiltImage

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
    (["boot", "core-grub", "--grub", "bios", "--trusted"], "--trusted and --grub are two different disks"),
])
def test_cli_refuses_a_boot_path_before_building(args: list[str], message: str) -> None:
    res = subprocess.run([sys.executable, "-m", "hadron", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    if "carry" in message:
        assert "core-grub" in res.stderr  # the hint names the images that do
