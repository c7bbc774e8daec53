"""The standard boot path, end to end: the core-grub image written as a GPT disk with GRUB for BIOS and
UEFI and a dracut initramfs, booted by SeaBIOS and by OVMF to multi-user.target with zero failed units.
Marked e2e; CI runs it after the core tier (core-grub extends core, so only grub, dracut, bash,
coreutils and libfts are built here)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN = os.environ.get("HADRON_E2E_TOOLCHAIN", "host")
TOOLS = ("bwrap", "qemu-system-x86_64", "mcopy", "mkfs.fat", "sfdisk", "mkfs.ext4")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(5400),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
    pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_CODE_4M.fd").is_file(), reason="needs ovmf"),
    pytest.mark.skipif(not Path("/usr/share/seabios/bios-256k.bin").is_file(), reason="needs seabios"),
]


def hadron(*args: str, timeout: float = 5400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hadron", *args, "--toolchain", TOOLCHAIN], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_grub_disk_layout(tmp_path: Path) -> None:
    out = tmp_path / "grub.raw"
    res = hadron("image", "disk", "core-grub", "--boot", "grub", "-o", str(out), "--json")
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    info = json.loads(res.stdout)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(out)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    types = [p["type"] for p in table["partitions"]]
    assert types == ["21686148-6449-6E6F-744E-656564454649", "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                     "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"]
    data = out.read_bytes()[:512 * 2048 * 2]
    # grub-bios-setup wrote boot.img into the MBR's boot code and core.img into the BIOS boot partition.
    assert data[0x1FE:0x200] == b"\x55\xaa" and b"GRUB" in data[:440]
    assert data[1 << 20:(1 << 20) + 512] != bytes(512)
    assert info["initramfs_bytes"] > 1 << 20
    # The ESP holds GRUB's UEFI executable.
    esp_offset = table["partitions"][1]["start"] * 512
    listing = subprocess.run(["mdir", "-i", f"{out}@@{esp_offset}", "::/EFI/BOOT"], capture_output=True, text=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert "BOOTX64" in listing.stdout, listing.stderr


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_grub_disk_boots_to_multi_user(firmware: str) -> None:
    res = hadron("boot", "core-grub", "--grub", firmware, "--check", "--json", "--timeout", "900")
    info = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    assert res.returncode == 0 and info.get("ok"), f"{res.stdout[-8000:]}\n{res.stderr[-3000:]}"
    assert info["state"] == "running" and info["failed_units"] == []
    assert info["firmware"] == firmware
    print(f"\ncore-grub via {firmware}: multi-user.target after {info['seconds_to_multi_user']} s "
          f"(disk {info['disk_bytes'] / 2**20:.0f} MiB, initramfs {info['initramfs_bytes'] / 2**20:.1f} MiB)")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("losetup") is None, reason="needs root and loop devices")
def test_bios_embedding_matches_grub_bios_setup(tmp_path: Path) -> None:
    """Hadron's embed_bios_grub against the image's own grub-bios-setup (--no-rs-codes) on a loop
    device: the two disks must be byte-identical. grub-bios-setup needs its directory on a block
    device it can name, so boot.img and core.img sit on a second, loop-mounted file system."""
    from hadron.boot import disk
    from hadron.boot import grub as grubboot

    res = hadron("build", "core-grub", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    root = Path(json.loads(res.stdout)["images"]["core-grub"]["path"]) / "rootfs"
    work = tmp_path / "w"
    work.mkdir()
    log = tmp_path / "log"
    images = grubboot.make_grub_images(root, "0000-test", work, log)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    disk.make_gpt_disk(ours, [
        disk.Partition("bios-boot", disk.BIOS_BOOT_TYPE, disk.stable_uuid("t", "b"), 1),
        disk.Partition("root", disk.ROOT_X86_64_TYPE, disk.stable_uuid("t", "r"), 4),
    ], disk_uuid=disk.stable_uuid("t", "d"))
    shutil.copy(ours, theirs)
    bios = disk.partition_table(ours)[0]
    grubboot.embed_bios_grub(ours, (work / "boot.img").read_bytes(), images["i386-pc"].read_bytes(),
                             bios.start, bios.sectors)
    fs, mnt = tmp_path / "dir.ext4", tmp_path / "mnt"
    subprocess.run(["truncate", "-s", "8M", str(fs)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(fs)], check=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    target = ""
    try:
        shutil.copy(work / "boot.img", mnt / "boot.img")
        shutil.copy(images["i386-pc"], mnt / "core.img")
        source = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(mnt)], capture_output=True, text=True,
                                check=True).stdout.strip()
        target = subprocess.run(["losetup", "-f", "--show", str(theirs)], capture_output=True, text=True,
                                check=True).stdout.strip()
        (tmp_path / "device.map").write_text(f"(hd0) {target}\n(hd1) {source}\n")
        loader = root / "usr/lib/libc.so"  # musl's dynamic loader, run as a program
        setup = subprocess.run([str(loader), str(root / "usr/sbin/grub-bios-setup"), "--no-rs-codes",
                                "--skip-fs-probe", "-m", str(tmp_path / "device.map"), "-d", str(mnt), target],
                               capture_output=True, text=True)
        assert setup.returncode == 0, setup.stderr
    finally:
        if target:
            subprocess.run(["losetup", "-d", target], check=False)
        subprocess.run(["umount", str(mnt)], check=False)
    assert ours.read_bytes() == theirs.read_bytes()
