"""UKI assembly on the host's systemd-stub, checked with pefile, binutils, sbsigntool and systemd-measure."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pefile  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hadron.boot import measure, uki
from hadron.errors import HadronError
from test_measure import MeasureTool, measure_tool  # noqa: F401  (session fixture shared with test_measure)

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
NEW_SECTIONS = [".osrel", ".cmdline", ".uname", ".pcrpkey", ".initrd", ".linux", ".pcrsig"]
OSREL = b'ID=hadron\nNAME="Hadron"\nVERSION_ID=1\n'
CMDLINE = "console=ttyS0 root=PARTLABEL=root ro"
UNAME = "6.12.9-hadron"
EXTRA_SBAT = "hadron,1,Hadron,hadron-uki,1,https://hadron.invalid/sbat\n"


@pytest.fixture(scope="module")
def stub() -> Path:
    if not STUB.exists():
        pytest.skip(f"{STUB} is absent (Debian package systemd-boot-efi)")
    return STUB


def fake_kernel(size: int = 12288) -> bytes:
    """Random bytes with an x86 boot protocol header: what a bzImage looks like to the builder."""
    data = bytearray(os.urandom(size))
    data[0:2] = b"\0\0"
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    return bytes(data)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("linux", "initrd", "pcr.key", "pcr.pub")}
    paths["linux"].write_bytes(fake_kernel())
    paths["initrd"].write_bytes(os.urandom(7000))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths["pcr.key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["pcr.pub"].write_bytes(measure.public_key_pem(key.public_key()))
    return paths


def build(stub: Path, inputs: dict[str, Path], out: Path, **overrides: object) -> uki.UkiInfo:
    kwargs: dict[str, object] = dict(
        linux=inputs["linux"], osrel=OSREL, cmdline=CMDLINE, initrd=inputs["initrd"], uname=UNAME, sbat=None,
        pcr_private_key=inputs["pcr.key"], pcr_public_key=inputs["pcr.pub"],
    )
    kwargs.update(overrides)
    return uki.build_uki(stub, out, **kwargs)  # type: ignore[arg-type]


def round_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


def test_layout_and_round_trip(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "hadron.efi"
    info = build(stub, inputs, out)
    stub_pe = pefile.PE(str(stub))
    pe = pefile.PE(str(out))
    oh = pe.OPTIONAL_HEADER
    names = [s.Name.rstrip(b"\0").decode() for s in pe.sections]
    stub_names = [s.Name.rstrip(b"\0").decode() for s in stub_pe.sections]

    # The stub's sections, unchanged and in place, then ours in ukify's order, .linux before .pcrsig.
    assert names == stub_names + NEW_SECTIONS
    assert pe.FILE_HEADER.NumberOfSections == len(names) == len(info.sections)
    assert [s.name for s in info.sections] == names
    assert info.written == (".sbat", *NEW_SECTIONS)
    for old, new in zip(stub_pe.sections, pe.sections, strict=False):
        assert (old.VirtualAddress, old.Misc_VirtualSize, old.Characteristics) == (
            new.VirtualAddress, new.Misc_VirtualSize, new.Characteristics)
        assert old.get_data() == new.get_data()
    assert pe.FILE_HEADER.PointerToSymbolTable == 0 and pe.FILE_HEADER.NumberOfSymbols == 0

    # Contents round-trip through read_uki_sections (VirtualSize bytes each).
    sections = uki.read_uki_sections(out)
    assert sections[".osrel"] == OSREL
    assert sections[".cmdline"] == CMDLINE.encode()
    assert sections[".uname"] == UNAME.encode()
    assert sections[".linux"] == inputs["linux"].read_bytes()
    assert sections[".initrd"] == inputs["initrd"].read_bytes()
    assert sections[".pcrpkey"] == inputs["pcr.pub"].read_bytes()
    assert sections[".sbat"] == uki.read_uki_sections(stub)[".sbat"]  # no extra entries: the stub's own
    assert sections[".pcrsig"] == measure.to_json(info.pcrsig or {})
    assert set(uki.read_uki_sections(out, uki_only=True)) == {".sbat", *NEW_SECTIONS}

    # Alignment, sizes and header fields.
    previous_end = max(s.VirtualAddress + max(s.Misc_VirtualSize, s.SizeOfRawData) for s in stub_pe.sections)
    for s in pe.sections[len(stub_names):]:
        name = s.Name.rstrip(b"\0").decode()
        assert s.VirtualAddress % oh.SectionAlignment == 0, name
        assert s.PointerToRawData % oh.FileAlignment == 0, name
        assert s.VirtualAddress >= previous_end, name
        assert s.Misc_VirtualSize == len(sections[name])
        assert s.SizeOfRawData == round_up(s.Misc_VirtualSize, oh.FileAlignment)
        code = name == ".linux"
        assert s.Characteristics == (0x40000020 if code else 0x40000040), name  # read-only code / data
        previous_end = s.VirtualAddress + s.Misc_VirtualSize
    last = pe.sections[-1]
    assert oh.SizeOfImage == round_up(last.VirtualAddress + last.Misc_VirtualSize, oh.SectionAlignment)
    assert oh.SizeOfHeaders % oh.FileAlignment == 0
    assert oh.SizeOfHeaders >= pe.sections[0].get_file_offset() + 40 * len(names)
    assert oh.SizeOfHeaders <= min(s.PointerToRawData for s in pe.sections)
    assert oh.CheckSum == pe.generate_checksum() != 0
    raw = sorted((s.PointerToRawData, s.PointerToRawData + s.SizeOfRawData) for s in pe.sections)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(raw))
    assert raw[-1][1] == out.stat().st_size == info.size
    assert pe.get_warnings() == stub_pe.get_warnings()  # nothing new for pefile to complain about

    # binutils and sbsigntool read it.
    objdump = shutil.which("objdump")
    if objdump:
        listing = subprocess.run([objdump, "-h", str(out)], capture_output=True, text=True, check=True).stdout
        for name in NEW_SECTIONS:
            assert f" {name} " in listing
    if shutil.which("sbverify"):
        res = subprocess.run(["sbverify", "--list", str(out)], capture_output=True, text=True)
        assert res.returncode == 0 and "No signature table present" in res.stdout + res.stderr

    # The 252 stub measures only the sections it knows: not .uname, not .sbat.
    assert info.stub_version.split(".")[0].isdigit()
    known = uki.stub_known_sections(pefile.PE(str(stub), fast_load=True))
    assert set(info.measured) == known & {".linux", ".osrel", ".cmdline", ".initrd", ".pcrpkey", ".uname", ".sbat"}
    assert info.measured == tuple(n for n in measure.UKI_SECTIONS if n in info.measured)


def test_pcrsig_equals_systemd_measure(
    stub: Path, inputs: dict[str, Path], tmp_path: Path, measure_tool: MeasureTool  # noqa: F811
) -> None:
    out = tmp_path / "hadron.efi"
    info = build(stub, inputs, out)
    if not set(info.measured) <= measure_tool.sections:
        pytest.skip(f"host systemd-measure takes {sorted(measure_tool.sections)}, the stub measures {info.measured}")
    sections = uki.read_uki_sections(out, uki_only=True)
    measured = {name: sections[name] for name in info.measured}
    signed = measure_tool.run("sign", measured, f"--private-key={inputs['pcr.key']}",
                              f"--public-key={inputs['pcr.pub']}", "--bank=sha256", "--json=short")
    # systemd-measure's entries for the standard phases, then the initrd-only entry ukify
    # --sign-initrd-pcrs adds (systemd-measure --policyref=initrd, which the host's tool may lack)
    pcrsig = json.loads(sections[".pcrsig"])
    tool = json.loads(signed)
    assert pcrsig["sha256"][:-1] == tool["sha256"]
    assert pcrsig["sha256"][-1]["ref"] == "initrd" and pcrsig["sha256"][-1]["pol"] == tool["sha256"][0]["pol"]
    calculated = measure_tool.run("calculate", measured, "--bank=sha256", "--json=short")
    assert measure.to_json(info.pcr11) + b"\n" == calculated
    assert measure.verify_policy_signature(info.pcrsig or {}, inputs["pcr.pub"]) == 5


def _test_db_cert(tmp_path: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hadron test db (TEST KEY)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, crt_path = tmp_path / "db.key", tmp_path / "db.crt"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, crt_path


def test_secure_boot_signature_covers_the_payload(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("sbsign") is None or shutil.which("sbverify") is None:
        pytest.skip("sbsign/sbverify are absent (Debian package sbsigntool)")
    out = tmp_path / "hadron.efi"
    build(stub, inputs, out, sbat=EXTRA_SBAT)
    key, crt = _test_db_cert(tmp_path)
    signed = tmp_path / "hadron.signed.efi"
    subprocess.run(["sbsign", "--key", str(key), "--cert", str(crt), "--output", str(signed), str(out)],
                   check=True, capture_output=True)
    ok = subprocess.run(["sbverify", "--cert", str(crt), str(signed)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    pe = pefile.PE(str(signed), fast_load=True)
    linux = next(s for s in pe.sections if s.Name.rstrip(b"\0") == b".linux")
    data = bytearray(signed.read_bytes())
    data[linux.PointerToRawData + 100] ^= 0x01
    tampered = tmp_path / "tampered.efi"
    tampered.write_bytes(bytes(data))
    bad = subprocess.run(["sbverify", "--cert", str(crt), str(tampered)], capture_output=True, text=True)
    assert bad.returncode != 0


def test_extra_sbat_entries_move_sbat(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    """The host stub's .sbat slot has 256 bytes of address space: longer SBAT tables move it."""
    out = tmp_path / "hadron.efi"
    extra = "sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\n" + EXTRA_SBAT
    info = build(stub, inputs, out, sbat=extra)
    stub_sbat = uki.read_uki_sections(stub)[".sbat"].rstrip(b"\0").decode()
    sbat = uki.read_uki_sections(out)[".sbat"]
    assert sbat == (stub_sbat + EXTRA_SBAT + "\0").encode()
    assert [line for line in sbat.decode().splitlines() if line.startswith("sbat,")] == [uki.SBAT_HEADER]
    names = [s.name for s in info.sections]
    assert names.count(".sbat") == 1
    assert names[-3:] == [".linux", ".sbat", ".pcrsig"]  # ukify's order when .sbat is appended
    # The stub's other sections still hold their data at their addresses.
    stub_pe = pefile.PE(str(stub), fast_load=True)
    pe = pefile.PE(str(out), fast_load=True)
    after = {s.Name: (s.VirtualAddress, s.get_data()[: s.Misc_VirtualSize]) for s in pe.sections}
    for s in stub_pe.sections:
        if s.Name.rstrip(b"\0") != b".sbat":
            assert after[s.Name] == (s.VirtualAddress, s.get_data()[: s.Misc_VirtualSize])
    assert subprocess.run(["objdump", "-h", str(out)], capture_output=True).returncode == 0


def test_kernel_sbat_is_merged(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    """A PE kernel's own .sbat entries come after the stub's (here: a copy of the stub posing as one)."""
    data = bytearray(stub.read_bytes())
    pe = pefile.PE(data=bytes(data), fast_load=True)
    sbat = next(s for s in pe.sections if s.Name.rstrip(b"\0") == b".sbat")
    text = b"sbat,1,SBAT Version,sbat,1,https://github.com/rhboot/shim/blob/main/SBAT.md\n" \
           b"linux,1,The Linux Developers,linux,6.12,https://linux.org\n"
    start, size = sbat.PointerToRawData, sbat.Misc_VirtualSize
    data[start : start + size] = text.ljust(size, b"\0")
    kernel = tmp_path / "vmlinuz.efi"
    kernel.write_bytes(bytes(data))
    out = tmp_path / "hadron.efi"
    build(stub, inputs, out, linux=kernel)
    merged = uki.read_uki_sections(out)[".sbat"].decode()
    stub_sbat = uki.read_uki_sections(stub)[".sbat"].decode().rstrip("\0")
    assert merged == stub_sbat + "linux,1,The Linux Developers,linux,6.12,https://linux.org\n\0"

    # A PE kernel for another machine type is refused.
    struct.pack_into("<H", data, pe.FILE_HEADER.get_file_offset(), 0xAA64)
    kernel.write_bytes(bytes(data))
    with pytest.raises(HadronError, match="machine 0xaa64"):
        build(stub, inputs, tmp_path / "other.efi", linux=kernel)


def test_unsigned_uki_without_keys(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "plain.efi"
    info = build(stub, inputs, out, pcr_private_key=None, pcr_public_key=None, initrd=None)
    names = [s.name for s in info.sections]
    assert ".pcrsig" not in names and ".pcrpkey" not in names and ".initrd" not in names
    assert info.pcrsig is None
    assert info.pcr11["sha256"][0]["hash"] == measure.predict_pcr11(
        uki.read_uki_sections(out, uki_only=True), "enter-initrd", known=info.measured
    ).hex()
    # A public key alone gives .pcrpkey (for policies) but no signature.
    info = build(stub, inputs, out, pcr_private_key=None)
    assert ".pcrpkey" in [s.name for s in info.sections] and info.pcrsig is None
    # The private key alone: .pcrpkey is its public half, in PEM SubjectPublicKeyInfo form.
    info = build(stub, inputs, out, pcr_public_key=None)
    assert uki.read_uki_sections(out)[".pcrpkey"] == inputs["pcr.pub"].read_bytes()


def _shift_pe_header(stub: Path, by: int) -> bytes:
    """The stub with its PE header moved ``by`` bytes later, leaving less room for section headers."""
    data = bytearray(stub.read_bytes())
    pe = pefile.PE(data=bytes(data), fast_load=True)
    start = pe.DOS_HEADER.e_lfanew
    end = pe.sections[-1].get_file_offset() + 40
    header = bytes(data[start:end])
    data[start:end] = bytes(end - start)
    data[start + by : end + by] = header
    struct.pack_into("<I", data, 0x3C, start + by)
    return bytes(data)


def test_errors_are_reported_before_writing(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "hadron.efi"
    out.write_bytes(b"previous")

    def fails(match: str, **overrides: object) -> None:
        with pytest.raises(HadronError, match=match):
            build(overrides.pop("stub", stub), inputs, out, **overrides)  # type: ignore[arg-type]
        assert out.read_bytes() == b"previous"

    fails("does not exist", stub=tmp_path / "missing.stub")
    (tmp_path / "garbage.stub").write_bytes(os.urandom(4096))
    fails("not a PE/EFI binary", stub=tmp_path / "garbage.stub")
    if BOOT.exists():
        fails("not systemd-stub", stub=BOOT)  # systemd-boot: a PE, but its .sdmagic says systemd-boot
    tight = tmp_path / "tight.stub"
    tight.write_bytes(_shift_pe_header(stub, 200))
    fails("no room for 7 more section headers", stub=tight)
    fails("kernel .* does not exist", linux=tmp_path / "missing-kernel")
    (tmp_path / "notakernel").write_bytes(b"\x7fELF" + os.urandom(4000))
    fails("neither a PE/EFI image nor an x86 bzImage", linux=tmp_path / "notakernel")
    fails("initrd .* does not exist", initrd=tmp_path / "missing-initrd")
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "other.pub").write_bytes(measure.public_key_pem(other.public_key()))
    fails("is not the public key of", pcr_public_key=tmp_path / "other.pub")
    fails("kernel command line is empty", cmdline="  ")
    fails("must be one printable word", uname="6.12 hadron")
    fails("invalid SBAT entry", sbat="not,an,entry\n")
    fails("unknown TPM PCR bank", pcr_banks=("md5",))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hadron.efi")] == []  # no temp files left


def test_tight_but_sufficient_header_room(stub: Path, inputs: dict[str, Path], tmp_path: Path) -> None:
    """With room for exactly the new headers the build fits; one more would not."""
    tight = tmp_path / "tight.stub"
    tight.write_bytes(_shift_pe_header(stub, 8))  # room left: (1024 - 720) // 40 = 7 headers
    info = build(tight, inputs, tmp_path / "ok.efi")
    assert [s.name for s in info.sections][-7:] == NEW_SECTIONS
    assert pefile.PE(str(tmp_path / "ok.efi")).OPTIONAL_HEADER.CheckSum != 0
