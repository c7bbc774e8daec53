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
