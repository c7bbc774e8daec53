"""Secure Boot test keys, checked with efitools, sbsigntool, openssl and virt-firmware."""

from __future__ import annotations

import re
import shutil
import stat
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hadron.boot import secureboot
from hadron.errors import HadronError

STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_VARS_MS = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")
EFI_IMAGE_SECURITY_DATABASE = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f")
# NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS | TIME_BASED_AUTHENTICATED_WRITE_ACCESS
AUTH_ATTRIBUTES = 0x27


def needs(*tools: str, package: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} absent (Debian package {package})")


needs_efitools = needs("cert-to-efi-sig-list", "sign-efi-sig-list", "sig-list-to-certs", package="efitools")
needs_sbsigntool = needs("sbsign", "sbverify", package="sbsigntool")
pytestmark = needs_efitools


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    return secureboot.generate_keys(tmp_path_factory.mktemp("sb") / "keys")


@pytest.fixture
def key_copy(keys: secureboot.KeySet, tmp_path: Path) -> Path:
    dest = tmp_path / "keys"
    shutil.copytree(keys.directory, dest)
    return dest


def test_generate_and_load(keys: secureboot.KeySet) -> None:
    d = keys.directory
    assert secureboot.load_keys(d) == keys
    assert (d / "owner-guid.txt").read_text().strip() == str(keys.owner_guid)
    readme = (d / "README.txt").read_text()
    assert readme.startswith("TEST KEYS - DO NOT USE IN PRODUCTION")
    assert str(keys.owner_guid) in readme
    for role in secureboot.ROLES:
        k = keys.role(role)
        cert = x509.load_pem_x509_certificate(k.crt.read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        assert cn == f"Hadron test {role} {secureboot.ROLE_LABELS[role]} (TEST KEY)"
        assert cert.issuer == cert.subject  # self-signed
        pub = cert.public_key()
        assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
        assert x509.load_der_x509_certificate(k.der.read_bytes()) == cert
        assert stat.S_IMODE(k.key.stat().st_mode) == 0o600
        assert b"BEGIN PRIVATE KEY" in k.key.read_bytes()
    assert stat.S_IMODE(keys.pcr_private_key.stat().st_mode) == 0o600
    assert keys.pcr_public_key.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    priv = serialization.load_pem_private_key(keys.pcr_private_key.read_bytes(), password=None)
    assert isinstance(priv, rsa.RSAPrivateKey) and priv.key_size == 2048
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".keys")]  # no staging left


def test_refuses_to_overwrite(keys: secureboot.KeySet, key_copy: Path) -> None:
    with pytest.raises(HadronError, match="already exists"):
        secureboot.generate_keys(key_copy)
    assert secureboot.load_keys(key_copy).owner_guid == keys.owner_guid
    new = secureboot.generate_keys(key_copy, force=True, common_name_prefix="Other")
    assert new.owner_guid != keys.owner_guid
    assert new.pk.crt.read_bytes() != keys.pk.crt.read_bytes()
    assert b"Other PK Platform Key (TEST KEY)" in x509.load_pem_x509_certificate(
        new.pk.crt.read_bytes()).subject.rfc4514_string().encode()
    assert sorted(p.name for p in key_copy.parent.iterdir()) == ["keys"]
    with pytest.raises(HadronError, match="longer than"):
        secureboot.generate_keys(key_copy.parent / "long", common_name_prefix="x" * 60)
    assert not (key_copy.parent / "long").exists()


def test_mismatches_name_the_file(key_copy: Path) -> None:
    d = key_copy
    pk_key, kek_key = (d / "PK.key").read_bytes(), (d / "KEK.key").read_bytes()
    (d / "PK.key").write_bytes(kek_key)
    (d / "KEK.key").write_bytes(pk_key)
    with pytest.raises(HadronError, match=re.escape(f"{d / 'PK.key'} does not match the certificate {d / 'PK.crt'}")):
        secureboot.load_keys(d)
    (d / "PK.key").write_bytes(pk_key)
    (d / "KEK.key").write_bytes(kek_key)
    secureboot.load_keys(d)

    (d / "db.cer").write_bytes((d / "KEK.cer").read_bytes())
    with pytest.raises(HadronError, match=re.escape("db.cer is not the DER form of")):
        secureboot.load_keys(d)
    (d / "db.cer").write_bytes(
        x509.load_pem_x509_certificate((d / "db.crt").read_bytes()).public_bytes(serialization.Encoding.DER))

    (d / "db.esl").write_bytes((d / "KEK.esl").read_bytes())
    with pytest.raises(HadronError, match=re.escape("db.esl does not hold exactly the certificate")):
        secureboot.load_keys(d)
    (d / "db.esl").write_bytes(b"garbage")
    with pytest.raises(HadronError, match=re.escape("db.esl")):
        secureboot.load_keys(d)


def test_missing_and_foreign_pcr_key(key_copy: Path) -> None:
    d = key_copy
    (d / "KEK.auth").unlink()
    with pytest.raises(HadronError, match=re.escape("KEK.auth is missing")):
        secureboot.load_keys(d)
    shutil.rmtree(d)
    fresh = secureboot.generate_keys(d)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    fresh.pcr_public_key.write_bytes(
        other.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(HadronError, match=re.escape("tpm2-pcr-public-key.pem is not the public key of")):
        secureboot.load_keys(d)
    with pytest.raises(HadronError, match="does not exist"):
        secureboot.load_keys(d.parent / "nowhere")


def test_esl_round_trip(keys: secureboot.KeySet, tmp_path: Path) -> None:
    for role in secureboot.ROLES:
        k = keys.role(role)
        out = subprocess.run(["sig-list-to-certs", str(k.esl), str(tmp_path / role)],
                             capture_output=True, text=True, check=True).stdout
        assert f"Guid {keys.owner_guid}" in out
        assert (tmp_path / f"{role}-0.der").read_bytes() == k.der.read_bytes()
        assert not (tmp_path / f"{role}-1.der").exists()


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def test_auth_updates_are_signed_by_the_right_key(keys: secureboot.KeySet, tmp_path: Path) -> None:
    """Each .auth is an EFI_VARIABLE_AUTHENTICATION_2 whose PKCS#7 verifies with the expected signer."""
    openssl = shutil.which("openssl")
    for role in secureboot.ROLES:
        k = keys.role(role)
        signer = keys.role(secureboot.UPDATE_SIGNER[role])
        auth = k.auth.read_bytes()
        timestamp = auth[:16]
        length, revision, cert_type = struct.unpack_from("<IHH", auth, 16)
        assert (revision, cert_type) == (0x0200, 0x0EF1)  # WIN_CERT_TYPE_EFI_GUID
        assert auth[24:40] == uuid.UUID("4aafd29d-68df-49ee-8aa9-347d375665a7").bytes_le  # EFI_CERT_TYPE_PKCS7_GUID
        esl = auth[16 + length:]
        assert esl == k.esl.read_bytes()
        payload = tmp_path / f"{role}.payload.esl"
        payload.write_bytes(esl)
        subprocess.run(["sig-list-to-certs", str(payload), str(tmp_path / f"{role}.auth")], check=True,
                       capture_output=True)
        assert (tmp_path / f"{role}.auth-0.der").read_bytes() == k.der.read_bytes()

        if openssl is None:
            continue
        # UEFI stores SignedData without its ContentInfo; wrap it so openssl can verify it over the
        # data firmware checks: name (UTF-16LE) || vendor GUID || attributes || timestamp || list.
        signed_data = auth[40 : 16 + length]
        oid = bytes.fromhex("06092a864886f70d010702")
        explicit = b"\xa0" + _der_len(len(signed_data)) + signed_data
        content_info = b"\x30" + _der_len(len(oid) + len(explicit)) + oid + explicit
        (tmp_path / f"{role}.p7").write_bytes(content_info)
        vendor = EFI_IMAGE_SECURITY_DATABASE if role == "db" else EFI_GLOBAL_VARIABLE
        content = role.encode("utf-16-le") + vendor.bytes_le + struct.pack("<I", AUTH_ATTRIBUTES) + timestamp + esl
        (tmp_path / f"{role}.content").write_bytes(content)
        res = subprocess.run(
            [openssl, "smime", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / f"{role}.p7"),
             "-content", str(tmp_path / f"{role}.content"), "-CAfile", str(signer.crt), "-purpose", "any",
             "-out", "/dev/null"],
            capture_output=True, text=True,
        )
        assert res.returncode == 0, f"{role}.auth: {res.stderr}"
        if role != secureboot.UPDATE_SIGNER[role]:
            other = keys.role(role)  # the role's own key did not sign its update
            res = subprocess.run(
                [openssl, "smime", "-verify", "-binary", "-inform", "DER", "-in", str(tmp_path / f"{role}.p7"),
                 "-content", str(tmp_path / f"{role}.content"), "-CAfile", str(other.crt), "-purpose", "any",
                 "-out", "/dev/null"],
                capture_output=True, text=True,
            )
            assert res.returncode != 0


@needs_sbsigntool
def test_sign_and_verify(keys: secureboot.KeySet, tmp_path: Path, key_copy: Path) -> None:
    if not STUB.exists():
        pytest.skip(f"{STUB} is absent (Debian package systemd-boot-efi)")
    signed = tmp_path / "stub.signed.efi"
    secureboot.sign_efi(keys, STUB, signed)
    secureboot.verify_efi(keys, signed)
    listing = subprocess.run(["sbverify", "--list", str(signed)], capture_output=True, text=True).stdout
    assert "Hadron test db Signature Database (TEST KEY)" in listing

    with pytest.raises(HadronError, match="No signature table present"):
        secureboot.verify_efi(keys, STUB)
    other = secureboot.generate_keys(tmp_path / "other")
    with pytest.raises(HadronError, match="is not validly signed by"):
        secureboot.verify_efi(other, signed)
    data = bytearray(signed.read_bytes())
    data[0x500] ^= 0xFF  # inside .text
    (tmp_path / "tampered.efi").write_bytes(bytes(data))
    with pytest.raises(HadronError, match="is not validly signed"):
        secureboot.verify_efi(keys, tmp_path / "tampered.efi")
    with pytest.raises(HadronError, match="does not exist"):
        secureboot.sign_efi(keys, tmp_path / "missing.efi", tmp_path / "x.efi")
    assert not (tmp_path / "x.efi").exists()


@pytest.mark.parametrize("template", [OVMF_VARS, OVMF_VARS_MS], ids=["empty", "microsoft"])
def test_enroll_ovmf_vars(keys: secureboot.KeySet, tmp_path: Path, template: Path) -> None:
    if not template.exists():
        pytest.skip(f"{template} is absent (Debian package ovmf)")
    out = tmp_path / "OVMF_VARS.fd"
    secureboot.enroll_ovmf_vars(keys, template, out)
    assert out.stat().st_size == template.stat().st_size

    cmd = secureboot._virt_fw_vars()
    printed = subprocess.run([*cmd, "--input", str(out), "--print"], capture_output=True, text=True, check=True)
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in printed.stdout.splitlines() if ":" in line}
    assert lines["SecureBootEnable"] == "bool: ON"
    assert lines["CustomMode"] == "bool: off"
    for role in secureboot.ROLES:
        assert lines[role] == f"blob: {keys.role(role).esl.stat().st_size} bytes"

    # The variables hold exactly our signature lists (the Microsoft template's keys are gone).
    from virt.firmware.varstore import autodetect  # type: ignore[import-untyped]

    varlist = autodetect.open_varstore(str(out)).get_varlist()
    for role in secureboot.ROLES:
        assert bytes(varlist[role].data) == keys.role(role).esl.read_bytes()
        (certs,) = [sl for sl in varlist[role].sigdb]
        assert certs.x509 == x509.load_pem_x509_certificate(keys.role(role).crt.read_bytes())
    assert bytes(varlist["SecureBootEnable"].data) == b"\x01"

    with pytest.raises(HadronError, match="refusing to overwrite the template"):
        secureboot.enroll_ovmf_vars(keys, out, out)
    with pytest.raises(HadronError, match="does not exist"):
        secureboot.enroll_ovmf_vars(keys, tmp_path / "missing.fd", tmp_path / "o.fd")
    assert [p.name for p in tmp_path.iterdir()] == ["OVMF_VARS.fd"]
