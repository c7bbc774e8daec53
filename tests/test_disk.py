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


def test_esp_and_initrd_are_byte_reproducible(tmp_path: Path) -> None:
    """The same files give the same ESP and initrd bytes, whenever and in whatever order they are made."""
    import os
    import time

    from hadron.boot import initrd

    def files(root: Path, order: list[str]) -> dict[str, Path]:
        out = {}
        for name in order:
            p = root / name.replace("/", "_")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(name.encode() * 100)
            os.utime(p, (time.time() - len(out) * 1000,) * 2)  # different times on the host
            out[name] = p
        return out

    names = ["EFI/BOOT/BOOTX64.EFI", "loader/loader.conf", "EFI/Linux/a.efi", "EFI/systemd/sd.efi"]
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    disk.make_esp(a, files(tmp_path / "1", names), size_mib=40, epoch=1735689600)
    time.sleep(1.1)
    disk.make_esp(b, files(tmp_path / "2", list(reversed(names))), size_mib=40, epoch=1735689600)
    assert a.read_bytes() == b.read_bytes()
    listing = subprocess.run(["mdir", "-/", "-i", a, "::/"], capture_output=True, text=True,
                             env={**os.environ, "MTOOLS_SKIP_CHECK": "1"}, check=True).stdout
    assert "2025-01-01" in listing and str(time.gmtime().tm_year) not in listing.replace("2025", "")

    trees = []
    for n in ("t1", "t2"):
        t = tmp_path / n
        (t / "usr/bin").mkdir(parents=True)
        (t / "usr/bin/init").write_bytes(b"\x7fELF" + bytes(100))
        (t / "etc").mkdir()
        (t / "etc/initrd-release").write_text("ID=hadron\n")
        (t / "init").symlink_to("usr/bin/init")
        trees.append(t)
        time.sleep(1.1)
    c, d = tmp_path / "c.zst", tmp_path / "d.zst"
    initrd.pack(trees[0], c, epoch=1735689600)
    initrd.pack(trees[1], d, epoch=1735689600)
    assert c.read_bytes() == d.read_bytes()
    # An archive another tool wrote with the time of the run comes out the same once repacked.
    e = tmp_path / "e.zst"
    raw = subprocess.run("find . | cpio --quiet -o -H newc", shell=True, cwd=trees[1], check=True,
                         capture_output=True).stdout
    e.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=raw, check=True, capture_output=True).stdout)
    assert e.read_bytes() != c.read_bytes()
    initrd.repack(e, epoch=1735689600)
    assert e.read_bytes() == c.read_bytes()
