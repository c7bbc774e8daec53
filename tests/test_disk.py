"""GPT disk images from plain files: layout read back by sfdisk, ESP by mtools, root by debugfs."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hadron.boot import disk
from hadron.errors import HadronError

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("sfdisk", "mkfs.fat", "mcopy", "mkfs.ext4", "debugfs")),
    reason="needs fdisk, dosfstools, mtools and e2fsprogs (scripts/host-setup installs them)",
)


def test_gpt_disk_with_esp_and_root(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hostname").write_text("hadron\n")
    loader = tmp_path / "loader.conf"
    loader.write_text("timeout 0\n")
    efi = tmp_path / "BOOTX64.EFI"
    efi.write_bytes(b"MZ" + bytes(5000))

    esp = tmp_path / "esp.img"
    disk.make_esp(esp, {"EFI/BOOT/BOOTX64.EFI": efi, "loader/loader.conf": loader}, size_mib=40)
    root_uuid = disk.stable_uuid("seed", "root-fs")
    root = tmp_path / "root.img"
    root_mib = disk.make_root_fs(rootfs, root, label="hadron-root", fs_uuid=root_uuid)
    parts = [
        disk.Partition("esp", disk.ESP_TYPE, disk.stable_uuid("seed", "esp"), 40, esp),
        disk.Partition("root-x86-64", disk.ROOT_X86_64_TYPE, disk.stable_uuid("seed", "root"), root_mib, root),
    ]
    out = tmp_path / "disk.raw"
    disk.make_gpt_disk(out, parts, disk_uuid=disk.stable_uuid("seed", "disk"))

    table = json.loads(subprocess.run(["sfdisk", "--json", str(out)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["id"].lower() == disk.stable_uuid("seed", "disk")
    got = [(p["name"], p["type"].upper(), p["uuid"].lower(), p["start"], p["size"]) for p in table["partitions"]]
    assert got == [
        ("esp", disk.ESP_TYPE, parts[0].uuid, 2048, 40 * 2048),
        ("root-x86-64", disk.ROOT_X86_64_TYPE, parts[1].uuid, 41 * 2048, root_mib * 2048),
    ]
    # The partitions hold the file systems: read them back at their offsets.
    listing = subprocess.run(["mdir", "-i", f"{out}@@{1 * 2**20}", "-b", "::/EFI/BOOT"], capture_output=True,
                             text=True, check=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert "BOOTX64.EFI" in listing
    part2 = tmp_path / "p2.img"
    with open(out, "rb") as f:
        f.seek(41 * 2**20)
        part2.write_bytes(f.read(root_mib * 2**20))
    cat = subprocess.run(["debugfs", "-R", "cat /etc/hostname", str(part2)], capture_output=True, text=True)
    assert cat.stdout == "hadron\n"
    uuid = subprocess.run(["dumpe2fs", "-h", str(part2)], capture_output=True, text=True).stdout
    assert root_uuid in uuid


def test_too_small_esp_is_refused(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(bytes(40 * 2**20))
    with pytest.raises(HadronError, match="too small"):
        disk.make_esp(tmp_path / "esp.img", {"EFI/Linux/big.efi": big}, size_mib=40)
    assert not (tmp_path / "esp.img").exists()
