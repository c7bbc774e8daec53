"""The trusted disk from an image: layout, signatures and the errors that must come before any write.
Uses Debian's systemd-stub and systemd-boot as stand-ins for the image's own and a fake kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hadron.boot import secureboot, uki
from hadron.boot import trusted as bootimage
from hadron.errors import HadronError
from hadron.image.build import BuiltImage

HOST_EFI = Path("/usr/lib/systemd/boot/efi")
TOOLS = ("sbsign", "sbverify", "cert-to-efi-sig-list", "sign-efi-sig-list", "sfdisk", "mcopy", "mkfs.fat")

pytestmark = [
    pytest.mark.skipif(not (HOST_EFI / "linuxx64.efi.stub").is_file(), reason="needs Debian's systemd-boot-efi"),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
]


def fake_kernel() -> bytes:
    data = bytearray(os.urandom(16384))
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


def fake_image(tmp_path: Path, *, kernel: bool = True, stub: bool = True) -> BuiltImage:
    path = tmp_path / "img"
    root = path / "rootfs"
    (root / "usr/lib/systemd/boot/efi").mkdir(parents=True)
    (root / "boot").mkdir()
    (root / "usr/lib/os-release").write_text('ID=hadron\nNAME="Hadron"\nVERSION_ID=0.1\n')
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("hadron\n")
    if kernel:
        (root / "boot/vmlinuz-7.2.8-cloud").write_bytes(fake_kernel())
    if stub:
        shutil.copy(HOST_EFI / "linuxx64.efi.stub", root / bootimage.STUB)
    shutil.copy(HOST_EFI / "systemd-bootx64.efi", root / bootimage.SYSTEMD_BOOT)
    record = {"version": "0.1", "kernel_release": "7.2.8-cloud" if kernel else None}
    return BuiltImage("core", "k" * 64, path, record, cached=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    return secureboot.generate_keys(tmp_path_factory.mktemp("keys") / "k")


def test_trusted_disk_layout_and_signatures(tmp_path: Path, keys: secureboot.KeySet) -> None:
    img = fake_image(tmp_path)
    out = tmp_path / "trusted.raw"
    d = bootimage.build_trusted_disk(img, keys, out)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(out)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert [p["name"] for p in table["partitions"]] == ["esp", bootimage.ROOT_NAME]
    assert table["partitions"][1]["uuid"].lower() == d.root_partuuid
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    esp = f"{out}@@{2**20}"
    for name, dest in [("EFI/BOOT/BOOTX64.EFI", "boot.efi"), ("EFI/Linux/core-0.1.efi", "uki.efi")]:
        subprocess.run(["mcopy", "-i", esp, f"::/{name}", str(tmp_path / dest)], check=True, env=env)
        secureboot.verify_efi(keys, tmp_path / dest)  # signed with the db key
    loader = subprocess.run(["mtype", "-i", esp, "::/loader/loader.conf"], capture_output=True, text=True,
                            env=env, check=True).stdout
    assert "timeout 0" in loader
    sections = uki.read_uki_sections(tmp_path / "uki.efi")
    assert f"root=PARTUUID={d.root_partuuid}" in sections[".cmdline"].decode()
    assert sections[".osrel"].startswith(b"ID=hadron")
    # The initrd is the image itself made into a systemd initrd: zstd frames holding a newc cpio.
    initrd = tmp_path / "initrd.cpio"
    (tmp_path / "initrd.zst").write_bytes(sections[".initrd"])
    subprocess.run(["zstd", "-q", "-d", str(tmp_path / "initrd.zst"), "-o", str(initrd)], check=True)
    listing = subprocess.run(["cpio", "-t", "--quiet"], stdin=initrd.open("rb"), capture_output=True,
                             check=True).stdout.decode().split()
    assert {"init", "etc/initrd-release", "etc/hostname"} <= set(listing)
    assert not any(n.startswith("boot") for n in listing)
    pcrsig = json.loads(sections[".pcrsig"].rstrip(b"\0"))
    # the standard phases, then the initrd-only policy under the reference "initrd"
    assert len(pcrsig["sha256"]) == len(bootimage.SIGNED_PHASES) + 1
    assert [e.get("ref") for e in pcrsig["sha256"]] == [None] * len(bootimage.SIGNED_PHASES) + ["initrd"]
    assert pcrsig["sha256"][-1]["pol"] == pcrsig["sha256"][0]["pol"]  # enter-initrd, as the first
    booted = bootimage.expected_booted_pcr11(d.uki)
    assert bootimage.policy_covers(d.uki, booted, keys.pcr_public_key)
    assert not bootimage.policy_covers(d.uki, "00" * 32, keys.pcr_public_key)


@pytest.mark.parametrize(("kernel", "stub", "message"), [
    (False, True, "has no kernel"),
    (True, False, "has no stub"),
])
def test_missing_boot_files_fail_before_writing(tmp_path: Path, keys: secureboot.KeySet, kernel: bool, stub: bool,
                                                message: str) -> None:
    img = fake_image(tmp_path, kernel=kernel, stub=stub)
    out = tmp_path / "out" / "trusted.raw"
    with pytest.raises(HadronError, match=message):
        bootimage.build_trusted_disk(img, keys, out)
    assert not out.exists()


def test_unsigned_stub_is_refused(tmp_path: Path, keys: secureboot.KeySet) -> None:
    # systemd-boot where the stub should be: not a systemd-stub, refused before anything is written.
    img = fake_image(tmp_path)
    shutil.copy(HOST_EFI / "systemd-bootx64.efi", img.rootfs / bootimage.STUB)
    out = tmp_path / "trusted.raw"
    with pytest.raises(HadronError, match=r"is not systemd-stub: no \.sdmagic"):
        bootimage.build_trusted_disk(img, keys, out)
    assert not out.exists()


def test_missing_or_mismatched_keys(tmp_path: Path, keys: secureboot.KeySet) -> None:
    with pytest.raises(HadronError, match="nothing-here does not exist"):
        secureboot.load_keys(tmp_path / "nothing-here")
    broken = tmp_path / "broken"
    shutil.copytree(keys.directory, broken)
    shutil.copy(keys.kek.key, broken / keys.db.key.relative_to(keys.directory))
    with pytest.raises(HadronError, match=r"db\.key does not match the certificate"):
        secureboot.load_keys(broken)
