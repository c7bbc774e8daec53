"""PCR 11 prediction and signing, checked against the host's systemd-measure on random inputs."""

from __future__ import annotations

import base64
import ctypes.util
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hadron.boot import measure
from hadron.errors import HadronError

SYSTEMD_MEASURE = Path("/usr/lib/systemd/systemd-measure")


@dataclass(frozen=True)
class MeasureTool:
    path: Path
    version: int
    sections: frozenset[str]  # UKI sections the tool takes (--linux= … → .linux …)
    tpm2_device: str | None  # systemd-measure before 255 computes the policy digest on a TPM

    @property
    def signature_hash(self) -> Literal["sha256", "bank"] | None:
        """How this version hashes for the signature: 252 uses the bank's algorithm, current ones
        SHA-256 (the change lies somewhere in between: for those only the sha256 bank is compared)."""
        if self.version <= 252:
            return "bank"
        return "sha256" if self.version >= 257 else None

    def run(self, verb: str, sections: Mapping[str, bytes], *args: str) -> bytes:
        with tempfile.TemporaryDirectory() as tmp:
            argv = [str(self.path), verb]
            for name, data in sections.items():
                f = Path(tmp) / name.lstrip(".")
                f.write_bytes(data)
                argv.append(f"--{name.lstrip('.')}={f}")
            if verb == "sign" and self.tpm2_device:
                argv.append(f"--tpm2-device={self.tpm2_device}")
            res = subprocess.run([*argv, *args], capture_output=True, timeout=60)
        assert res.returncode == 0, f"{argv} failed: {res.stderr.decode(errors='replace')}"
        return res.stdout


def start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A software TPM on a unix socket; returns the process and systemd's TCTI device string."""
    swtpm = shutil.which("swtpm")
    assert swtpm is not None
    sock = state / "tpm.sock"
    log = state / "swtpm.log"
    with log.open("wb") as logf:
        proc = subprocess.Popen(
            [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}",
             "--server", f"type=unixio,path={sock}", "--ctrl", f"type=unixio,path={sock}.ctrl",
             "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 15
    while not (sock.exists() and Path(f"{sock}.ctrl").exists()):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            raise AssertionError(f"swtpm did not start: {log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc, f"swtpm:path={sock}"


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def measure_tool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeasureTool]:
    if not SYSTEMD_MEASURE.exists():
        pytest.skip(f"{SYSTEMD_MEASURE} is absent (Debian package systemd >= 252)")
    out = subprocess.run([str(SYSTEMD_MEASURE), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.match(r"systemd (\d+)", out)
    assert m, out
    version = int(m.group(1))
    help_text = subprocess.run([str(SYSTEMD_MEASURE), "--help"], capture_output=True, text=True).stdout
    options = set(re.findall(r"--([a-z]+)=PATH", help_text))
    sections = frozenset(s for s in measure.UKI_SECTIONS if s.lstrip(".") in options)
    assert ".linux" in sections, help_text
    proc = None
    device = None
    if version < 255:
        missing = [lib for lib in ("tss2-esys", "tss2-tcti-swtpm") if ctypes.util.find_library(lib) is None]
        if shutil.which("swtpm") is None or missing:
            pytest.skip(
                f"systemd-measure {version} signs through a TPM: needs swtpm and lib{', lib'.join(missing)} "
                "(Debian packages swtpm, libtss2-esys-3.0.2-0, libtss2-tcti-swtpm0)"
            )
        proc, device = start_swtpm(tmp_path_factory.mktemp("swtpm"))
    try:
        yield MeasureTool(SYSTEMD_MEASURE, version, sections, device)
    finally:
        if proc is not None:
            stop_process(proc)


def _rsa_pem_pair(bits: int = 2048) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return priv, measure.public_key_pem(key.public_key())


@pytest.fixture(scope="session")
def keypair() -> tuple[bytes, bytes]:
    return _rsa_pem_pair()


@pytest.fixture(scope="session")
def keyfiles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pcrkey")
    (d / "priv.pem").write_bytes(keypair[0])
    (d / "pub.pem").write_bytes(keypair[1])
    return d / "priv.pem", d / "pub.pem"


# Random UKI contents: any subset of the sections the host tool takes (.linux always), including
# empty sections (which neither side measures), and random phase paths.
contents = st.binary(min_size=0, max_size=3000)
phase_word = st.sampled_from(measure.KNOWN_PHASES) | st.from_regex(r"[a-z][a-z0-9-]{0,12}", fullmatch=True)
phase_path = st.lists(phase_word, min_size=1, max_size=4).map(":".join)
phase_lists = st.lists(phase_path, min_size=1, max_size=4)
banks = st.lists(st.sampled_from(["sha1", "sha256", "sha384", "sha512"]), min_size=1, max_size=4, unique=True)


def sections_for(tool_sections: frozenset[str]) -> st.SearchStrategy[dict[str, bytes]]:
    names = sorted(tool_sections - {".linux"})
    return st.builds(
        lambda linux, rest: {".linux": linux, **rest},
        st.binary(min_size=1, max_size=4000),
        st.dictionaries(st.sampled_from(names), contents, max_size=len(names)),
    )


def phase_args(phases: Sequence[str]) -> list[str]:
    return [f"--phase={p}" for p in phases]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_calculate_matches_systemd_measure(measure_tool: MeasureTool, data: st.DataObject) -> None:
    sections = data.draw(sections_for(measure_tool.sections))
    phases = data.draw(phase_lists)
    bank_list = data.draw(banks)
    out = measure_tool.run("calculate", sections, "--json=short", *phase_args(phases),
                           *(f"--bank={b}" for b in bank_list))
    ours = measure.calculate(sections, phases, bank_list)
    assert measure.to_json(ours) + b"\n" == out
    # predict_pcr11 agrees with the table, for a path given as a string or as its words.
    first = measure.normalize_phases(phases)[0]
    expected = json.loads(out)[measure.normalize_banks(bank_list)[0]][0]["hash"]
    bank = measure.normalize_banks(bank_list)[0]
    assert measure.predict_pcr11(sections, first, bank).hex() == expected
    assert measure.predict_pcr11(sections, first.split(":"), bank).hex() == expected


def test_calculate_default_phases_and_edge_cases(measure_tool: MeasureTool) -> None:
    sections = {".linux": b"kernel" * 100, ".osrel": b"ID=hadron\n", ".cmdline": b""}
    out = measure_tool.run("calculate", sections, "--json=short", "--bank=sha256")
    assert measure.to_json(measure.calculate(sections)) + b"\n" == out
    # An empty phase path is the value right after the stub; "ready::" is "ready"; duplicates go.
    phases = ["", "ready::", "ready", "sysinit"]
    out = measure_tool.run("calculate", sections, "--json=short", "--bank=SHA256", *phase_args(phases))
    ours = measure.calculate(sections, phases, ["SHA256"])
    assert measure.to_json(ours) + b"\n" == out
    assert [e.get("phase") for e in ours["sha256"]] == [None, "ready", "sysinit"]
    assert measure.predict_pcr11(sections).hex() == ours["sha256"][0]["hash"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sign_matches_systemd_measure(
    measure_tool: MeasureTool, keyfiles: tuple[Path, Path], keypair: tuple[bytes, bytes], data: st.DataObject
) -> None:
    sections = data.draw(sections_for(measure_tool.sections))
    phases = data.draw(st.none() | phase_lists)
    mode = measure_tool.signature_hash
    bank_list = data.draw(banks) if mode else ["sha256"]
    priv, pub = keyfiles
    args = [f"--private-key={priv}", f"--public-key={pub}", "--json=short", *(f"--bank={b}" for b in bank_list)]
    if phases is not None:
        args += phase_args(phases)
    out = measure_tool.run("sign", sections, *args)
    ours = measure.sign_policy(sections, keypair[0], keypair[1], phases or measure.DEFAULT_PHASES, bank_list,
                               signature_hash=mode or "sha256")
    # PKCS#1 v1.5 signatures are deterministic: the JSON is byte-identical.
    assert measure.to_json(ours) + b"\n" == out
    assert measure.verify_policy_signature(ours, keypair[1], mode or "sha256") == len(bank_list) * len(
        measure.normalize_phases(phases or measure.DEFAULT_PHASES)
    )
    # The default (current systemd: SHA-256 for every bank) differs from 252 only outside sha256.
    current = measure.sign_policy(sections, keypair[0], keypair[1], phases or measure.DEFAULT_PHASES, bank_list)
    assert [e["pol"] for v in current.values() for e in v] == [e["pol"] for v in ours.values() for e in v]
    if "sha256" in current:
        assert current["sha256"] == ours["sha256"]


def test_sign_default_phases_without_public_key(measure_tool: MeasureTool, keyfiles: tuple[Path, Path]) -> None:
    sections = {".linux": bytes(range(256)) * 20, ".osrel": b"ID=hadron\nVERSION_ID=1\n", ".cmdline": b"quiet"}
    priv = keyfiles[0]
    out = measure_tool.run("sign", sections, f"--private-key={priv}", "--bank=sha256", "--json=short")
    ours = measure.sign_policy(sections, priv)  # paths work as well as PEM bytes
    assert measure.to_json(ours) + b"\n" == out
    doc = json.loads(out)
    assert list(doc) == ["sha256"]
    assert [sorted(e) for e in doc["sha256"]] == [["pcrs", "pkfp", "pol", "sig"]] * 4
    assert all(e["pcrs"] == [11] and len(base64.b64decode(e["sig"])) == 256 for e in doc["sha256"])


def test_policy_digest_matches_tool_pol(measure_tool: MeasureTool, keyfiles: tuple[Path, Path]) -> None:
    sections = {".linux": b"\x01" * 4096}
    priv, _ = keyfiles
    for bank in ("sha1", "sha256"):
        out = measure_tool.run("sign", sections, f"--private-key={priv}", f"--bank={bank}", "--phase=sysinit",
                               "--json=short")
        pcr = measure.predict_pcr11(sections, "sysinit", bank)
        pol = measure.policy_digest(pcr, bank)
        assert len(pol) == 32  # the policy session hash is SHA-256 whatever the bank
        assert json.loads(out)[bank][0]["pol"] == pol.hex()
        assert measure.policy_digest({11: pcr}, bank) == pol


def test_fingerprint_is_sha256_of_pkcs1_der(keypair: tuple[bytes, bytes]) -> None:
    import hashlib

    pub = measure.load_pcr_public_key(keypair[1])
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    assert measure.public_key_fingerprint(pub) == hashlib.sha256(der).hexdigest()


def test_known_filter_and_order() -> None:
    sections = {".uname": b"6.12.0", ".linux": b"k", ".sbat": b"sbat,1\n", ".pcrsig": b"{}", ".osrel": b"ID=x\n"}
    order = [n for n, _ in measure.measured_sections(sections)]
    assert order == [".linux", ".osrel", ".uname", ".sbat"]
    v252 = {".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrsig", ".pcrpkey"}
    assert [n for n, _ in measure.measured_sections(sections, v252)] == [".linux", ".osrel"]
    assert measure.predict_pcr11(sections, known=v252) == measure.predict_pcr11({".linux": b"k", ".osrel": b"ID=x\n"})
    assert measure.predict_pcr11(sections) != measure.predict_pcr11(sections, known=v252)


def test_mismatched_keys_are_refused(keypair: tuple[bytes, bytes], tmp_path: Path) -> None:
    other_priv, other_pub = _rsa_pem_pair()
    sections = {".linux": b"kernel"}
    with pytest.raises(HadronError, match="is not the public key of"):
        measure.sign_policy(sections, keypair[0], other_pub)
    (tmp_path / "a.pem").write_bytes(other_priv)
    (tmp_path / "b.pub").write_bytes(keypair[1])
    with pytest.raises(HadronError) as e:
        measure.sign_policy(sections, tmp_path / "a.pem", tmp_path / "b.pub")
    assert str(tmp_path / "b.pub") in str(e.value) and str(tmp_path / "a.pem") in str(e.value)
    # A signature made with one key does not verify with another.
    sig = measure.sign_policy(sections, other_priv)
    with pytest.raises(HadronError, match="another key"):
        measure.verify_policy_signature(sig, keypair[1])
    entry = sig["sha256"][0]
    entry["pol"] = "00" * 32
    with pytest.raises(HadronError, match="does not verify"):
        measure.verify_policy_signature(sig, other_pub)


def test_bad_key_inputs(tmp_path: Path) -> None:
    sections = {".linux": b"kernel"}
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(HadronError, match="encrypted"):
        measure.sign_policy(sections, encrypted)
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(HadronError, match="not an RSA key"):
        measure.sign_policy(sections, ec_key)
    with pytest.raises(HadronError, match="not a PEM private key"):
        measure.sign_policy(sections, b"garbage")
    with pytest.raises(HadronError, match="cannot read"):
        measure.sign_policy(sections, tmp_path / "missing.pem")


def test_input_validation() -> None:
    with pytest.raises(HadronError, match="not UKI sections: linux"):
        measure.predict_pcr11({"linux": b"x"})
    with pytest.raises(HadronError, match="unknown TPM PCR bank"):
        measure.calculate({".linux": b"x"}, banks=["md5"])
    with pytest.raises(HadronError, match="no boot phase"):
        measure.calculate({".linux": b"x"}, phases=[])
    with pytest.raises(HadronError, match="out of range"):
        measure.policy_digest({24: bytes(32)})
    with pytest.raises(HadronError, match="has 20 bytes"):
        measure.policy_digest(bytes(20), "sha256")


def test_policy_ref_signs_the_digest_followed_by_the_reference_digest(keypair: tuple[bytes, bytes]) -> None:
    """systemd-measure --policyref=initrd (ukify --sign-initrd-pcrs): the signature covers the PolicyPCR
    digest followed by SHA-256("initrd"), the TPM2_PolicyAuthorize policyRef systemd 262's
    systemd-tpm2-setup uses to initialize NvPCRs; the entry names the reference in "ref"."""
    import hashlib

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    sections = {".linux": b"kernel", ".osrel": b"ID=hadron\n"}
    plain = measure.sign_policy(sections, keypair[0], phases=measure.INITRD_PHASES)
    ref = measure.sign_policy(sections, keypair[0], phases=measure.INITRD_PHASES, policy_ref="initrd")
    (p,), (r,) = plain["sha256"], ref["sha256"]
    assert list(r) == ["pcrs", "pkfp", "ref", "pol", "sig"] and r["ref"] == "initrd" and "ref" not in p
    assert r["pol"] == p["pol"]  # the same PCR state, a different authorization
    pub = measure.load_pcr_public_key(keypair[1])
    signed = bytes.fromhex(r["pol"]) + hashlib.sha256(b"initrd").digest()
    pub.verify(base64.b64decode(r["sig"]), signed, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(InvalidSignature):
        pub.verify(base64.b64decode(r["sig"]), bytes.fromhex(r["pol"]), padding.PKCS1v15(), hashes.SHA256())
    combined = measure.combine_signatures(plain, ref)
    assert combined["sha256"] == [p, r]
    assert measure.verify_policy_signature(combined, keypair[1]) == 2
    # an entry whose reference was changed no longer verifies
    forged = {"sha256": [{**r, "ref": "other"}]}
    with pytest.raises(HadronError, match="does not verify"):
        measure.verify_policy_signature(forged, keypair[1])
