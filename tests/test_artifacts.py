"""Boot artifacts compared by verify-repro: a difference located by GPT partition or PE section; the
disk steps' umask pinned; the varied process restored."""

from __future__ import annotations

import os
import shutil
import stat
import time
from pathlib import Path

import pefile  # type: ignore[import-untyped]
import pytest

from hadron.boot import artifacts, disk
from hadron.engine.fetch import file_sha256
from hadron.engine.sandbox import Variation
from hadron.trust import repro

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")


def two_part_disk(tmp_path: Path, name: str, root: bytes) -> Path:
    esp, blob = tmp_path / f"{name}-esp.img", tmp_path / f"{name}-root.img"
    esp.write_bytes(b"E" * disk.MIB)
    blob.write_bytes(root)
    out = tmp_path / f"{name}.raw"
    disk.make_gpt_disk(out, [
        disk.Partition("esp", disk.ESP_TYPE, disk.stable_uuid("s", "esp"), 1, esp),
        disk.Partition("root", disk.ROOT_X86_64_TYPE, disk.stable_uuid("s", "root"), 2, blob),
    ], disk_uuid=disk.stable_uuid("s", "disk"))
    return out


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk (fdisk)")
def test_a_disk_difference_is_located_by_partition(tmp_path: Path) -> None:
    root = bytes(range(256)) * 4096
    a = two_part_disk(tmp_path, "a", root)
    b = two_part_disk(tmp_path, "b", root)
    assert file_sha256(a) == file_sha256(b)
    c = two_part_disk(tmp_path, "c", root[:5000] + b"\xff" + root[5001:])
    assert file_sha256(a) != file_sha256(c)
    where = artifacts.differences("disk", a, c)
    assert where == [f"partition 2 (type {disk.ROOT_X86_64_TYPE}, uuid {disk.stable_uuid('s', 'root').upper()}): "
                     "contents differ"]


def flip(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.skipif(not STUB.exists(), reason=f"{STUB} is absent (Debian package systemd-boot-efi)")
def test_a_pe_difference_is_located_by_section(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.efi", tmp_path / "b.efi", tmp_path / "c.efi"
    for p in (a, b, c):
        shutil.copyfile(STUB, p)
    pe = pefile.PE(str(STUB), fast_load=True)
    sbat = next(s for s in pe.sections if s.Name.rstrip(b"\0") == b".sbat")
    flip(b, sbat.PointerToRawData + 3)
    where = artifacts.differences("uki", a, b)
    assert len(where) == 1 and where[0].startswith("section .sbat: ") and "offset 3" in where[0]
    flip(c, pe.DOS_HEADER.e_lfanew - 1)  # the DOS stub: in no section
    assert artifacts.differences("uki", a, c) == [
        "PE headers or the Authenticode signature (every section is identical)"]


def test_disk_steps_pin_the_umask(tmp_path: Path) -> None:
    @disk.standard_umask()
    def step(d: Path) -> None:
        (d / "mnt").mkdir()
        (d / "os-release").write_text("ID=hadron\n")

    old = os.umask(0o002)
    try:
        step(tmp_path)
        assert os.umask(0o002) == 0o002  # the caller's umask is back
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "mnt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "os-release").stat().st_mode) == 0o644


def test_the_varied_process_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    monkeypatch.delenv("LC_ALL", raising=False)
    v = Variation(umask=0o002, env={"TZ": "<+14>-14", "LC_ALL": "C.UTF-8"})
    with repro.varied_process(v):
        assert os.environ["TZ"] == "<+14>-14" and os.environ["LC_ALL"] == "C.UTF-8"
        assert time.strftime("%z", time.localtime(0)) == "+1400"
        (tmp_path / "f").write_text("x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o664
    assert os.environ["TZ"] == "UTC" and "LC_ALL" not in os.environ
    assert time.strftime("%z", time.localtime(0)) == "+0000"
