"""The immutable disk without a VM: core-immutable's partition definitions, repart's report, the build-time
drop-ins, version stamping, the probe script and how the check judges what a boot showed."""

from __future__ import annotations

import configparser
import json
import subprocess
from pathlib import Path

import pytest

from hadron.boot import immutable, qemu, repart
from hadron.errors import HadronError

ROOT = Path(__file__).resolve().parents[1]
DEFS = ROOT / "distro/images/core-immutable/files/usr/lib/repart.d"


def definitions() -> dict[str, dict[str, str]]:
    out = {}
    for p in sorted(DEFS.glob("*.conf")):
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read(p)
        out[p.name] = dict(cp["Partition"])
    return out


def test_slots_a_and_b_have_the_same_fixed_sizes() -> None:
    d = definitions()
    by_type: dict[str, list[dict[str, str]]] = {}
    for conf in d.values():
        by_type.setdefault(conf["Type"], []).append(conf)
    for t in ("root", "root-verity", "root-verity-sig"):
        a, b = by_type[t]
        assert b["Label"] == "_empty" and a["Label"].startswith("%M_%A")
        if t != "root-verity-sig":  # repart sizes signature partitions itself
            assert a["SizeMinBytes"] == a["SizeMaxBytes"] == b["SizeMinBytes"] == b["SizeMaxBytes"]
    root_a = by_type["root"][0]
    assert root_a["Format"] == "erofs" and root_a["Verity"] == "data" and root_a["CopyFiles"] == "/"
    # the ESP is filled from a FAT image at build time (CopyBlocks= cannot be combined with Format=)
    esp = by_type["esp"][0]
    assert "Format" not in esp and esp["SizeMinBytes"] == esp["SizeMaxBytes"]
    # /var is the one partition the first boot adds: LUKS2 bound to the signed PCR 11 policy only (no
    # PCR values, which an update would change), opened by its label and mounted from /dev/mapper
    var = by_type["var"][0]
    assert var["Format"] == "ext4" and var["Encrypt"] == "tpm2" and "SizeMaxBytes" not in var
    assert "TPM2PCRs" not in var
    etc = DEFS.parents[2] / "etc"
    crypttab = [ln.split() for ln in (etc / "crypttab").read_text().splitlines() if ln and not ln.startswith("#")]
    assert crypttab == [["var", f"PARTLABEL={var['Label']}", "-",
                         "tpm2-device=auto,headless=yes,x-systemd.requires=systemd-repart.service"]]
    assert "/dev/mapper/var /var ext4" in (etc / "fstab").read_text()


REPORT = [
    {"type": "esp", "label": "ESP", "uuid": "ba6bb044-fdd4-4664-bc75-334f6b87c8f2", "partno": 0,
     "offset": 1048576, "raw_size": 268435456, "activity": "create", "roothash": None},
    {"type": "root-x86-64", "label": "core-immutable_0.1", "uuid": "e4496589-19c7-86bb-19a8-8a91de2eca70",
     "partno": 1, "offset": 269484032, "raw_size": 268435456, "activity": "create",
     "roothash": "e449658919c786bb19a88a91de2eca7068382474e463e35a58254e4708772fca"},
]


def test_parse_report_reads_the_last_json_line() -> None:
    text = "Formatting future partition 1.\n[ not json ] log line\n" + json.dumps(REPORT) + "\n"
    parts = repart.parse_report(text, "test")
    assert [p.role for p in parts] == ["esp", "root"]
    assert parts[1].roothash and parts[1].roothash.startswith("e4496589") and parts[1].offset == 269484032
    assert immutable.roothash_of(parts, "x") == REPORT[1]["roothash"]
    with pytest.raises(HadronError, match="no partition report"):
        repart.parse_report("Failed to open\n", "test")
    with pytest.raises(HadronError, match="0 verity root hashes"):
        immutable.roothash_of(parts[:1], "x")


def test_stage_definitions_adds_drop_ins_only_to_existing_definitions(tmp_path: Path) -> None:
    staged = repart.stage_definitions(DEFS, tmp_path, {"10-esp.conf": "CopyBlocks=/tmp/out/esp.img\n"})
    assert (staged / "10-esp.conf.d/50-hadron-build.conf").read_text() == "[Partition]\nCopyBlocks=/tmp/out/esp.img\n"
    assert (staged / "10-esp.conf").read_text() == (DEFS / "10-esp.conf").read_text()
    with pytest.raises(HadronError, match=r"no partition definition 99-x\.conf"):
        repart.stage_definitions(DEFS, tmp_path, {"99-x.conf": "x=1\n"})


@pytest.mark.parametrize("bad", ["1_2", "2+1", "", "-1", "a b"])
def test_versions_that_would_break_names_are_refused(bad: str) -> None:
    with pytest.raises(HadronError, match="not usable"):
        immutable.check_version(bad)


def test_uki_names_carry_the_boot_counter() -> None:
    assert immutable.uki_file_name("core-immutable", "2") == "EFI/Linux/core-immutable_2+3.efi"
    assert immutable.uki_file_name("core-immutable", "2", None) == "EFI/Linux/core-immutable_2.efi"
    assert "default" not in immutable.LOADER_CONF


def test_stamp_version_replaces_image_version_without_touching_the_image(tmp_path: Path) -> None:
    image = tmp_path / "image-os-release"
    image.write_text("ID=hadron\nIMAGE_ID=core-immutable\nIMAGE_VERSION=0.1\n")
    tree = tmp_path / "root"
    (tree / "usr/lib").mkdir(parents=True)
    (tree / "usr/lib/os-release").hardlink_to(image)
    immutable.stamp_version(tree, "2")
    assert immutable.os_release(tree)["IMAGE_VERSION"] == "2"
    assert image.read_text().endswith("IMAGE_VERSION=0.1\n")


def test_probe_is_valid_shell() -> None:
    assert subprocess.run(["sh", "-n", "-c", immutable.PROBE]).returncode == 0


def disk(roothash: str = "ab" * 32) -> immutable.ImmutableDisk:
    return immutable.ImmutableDisk(Path("/d"), None, "EFI/Linux/c_1+3.efi", "c", "1", roothash,  # type: ignore[arg-type]
                                   f"roothash={roothash} console=ttyS0", (), 0)


GOOD = {"root": "/dev/mapper/root erofs ro,relatime", "write": "touch: /usr/.hadron-write-test: Read-only file system",
        "verity-root-hash": "ab" * 32, "cmdline": f"roothash={'ab' * 32} console=ttyS0",
        "var": "/dev/mapper/var ext4 rw,relatime", "var-crypt": "LUKS2 1 tpm2 token(s)", "version": "1"}


def test_judge_accepts_a_good_boot_and_names_each_fault() -> None:
    assert immutable.judge_first_boot(disk(), GOOD) == []
    faults = {"root": "/dev/vda2 ext4 rw", "write": "write allowed", "verity-root-hash": "cd" * 32,
              "cmdline": "console=ttyS0", "var": "/dev/vda8 ext4 rw", "var-crypt": "  0 tpm2 token(s)",
              "version": "0.1"}
    for key, value in faults.items():
        (problem,) = immutable.judge_first_boot(disk(), {**GOOD, key: value})
        assert problem


def test_refusal_needs_the_expected_evidence() -> None:
    stuck = qemu.BootResult(state=None, console="[  99.1] \x1b[0;1;31m TIME \x1b[0m] Timed out waiting for device "
                                                "/dev/disk/by-partuuid/x.\nYou are in emergency mode\n")
    a = immutable._refusal("digit", stuck, "Timed out waiting for device")
    assert a.ok and "Timed out waiting for device" in a.evidence
    assert not immutable._refusal("flip", stuck, "is corrupted").ok
    booted = qemu.BootResult(state="running", console="HADRON-CHECK state=running\n")
    assert immutable._refusal("digit", booted, "Timed out").result.startswith("wrong: it booted")


def test_flip_byte_changes_one_byte(tmp_path: Path) -> None:
    f = tmp_path / "disk"
    f.write_bytes(bytes(4096))
    part = repart.RepartPartition("root-x86-64", "r", "u", 1, 1024, 2048, None, "create")
    immutable.flip_byte(f, part, 10)
    data = f.read_bytes()
    assert data[1034] == 0xFF and data.count(0) == 4095
