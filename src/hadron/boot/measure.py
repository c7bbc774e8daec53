"""Predict and sign TPM2 PCR 11 for a Unified Kernel Image, as ``systemd-measure`` does.

systemd-stub measures the UKI's own PE sections into PCR 11 before it starts the kernel, and
systemd-pcrphase later extends the boot phase words into the same PCR. Both are static, so the
values PCR 11 will hold in each boot phase can be computed at build time and signed: a TPM2
policy bound to the signing key (PolicyAuthorize) then accepts any kernel whose signed PCR 11
value matches, instead of one exact PCR value.

The computation, for each PCR bank:

* PCR 11 starts at zero. ``extend(data)`` sets ``pcr = H(pcr || H(data))``.
* For each UKI section present, in the fixed order below (not the PE layout order), the stub
  extends the section name including its trailing NUL byte, then the section contents. Sections
  with no contents are skipped, and ``.pcrsig`` is never measured (it holds the signatures of the
  result).
* Each word of a boot phase path (``enter-initrd:leave-initrd`` …) is extended, without a NUL.

Phase paths are normalized as systemd-measure does: empty words dropped, duplicates removed,
sorted.

A signature entry covers one phase path: the TPM2 PolicyPCR digest for PCR 11 in that bank is
``H(0…0 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(PCR values))`` with SHA-256 whatever the
bank, and the signature is RSASSA-PKCS1-v1_5 with SHA-256 over that digest, which is what
TPM2_PolicyAuthorize verifies for an empty policyRef. (systemd 252 hashed with the bank's own
algorithm instead; that only differs for banks other than SHA-256, see ``sign_policy``.)
``pkfp`` is the SHA-256 of the public key in PKCS#1 ``RSAPublicKey`` DER form. The JSON layout
(``{"sha256": [{"pcrs": [11], "pkfp", "pol", "sig"}]}``, banks in TPM algorithm order) is the one
systemd-measure prints and systemd-stub, systemd-cryptsetup and systemd-creds read;
``tests/test_measure.py`` checks it byte for byte against the host's systemd-measure.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hadron.errors import HadronError

KERNEL_BOOT_PCR = 11

# The canonical measurement order of UKI sections (the UKI specification's order, which
# systemd-stub walks). Older stubs know a prefix-compatible subset: systemd 252 knows .linux,
# .osrel, .cmdline, .initrd, .splash, .dtb, .pcrsig and .pcrpkey; later releases added .uname,
# .sbat, .ucode, .profile, .dtbauto, .hwids and .efifw at the positions shown. A stub measures
# every section it knows except .pcrsig, so what is measured depends on the stub (see
# ``measured_sections``).
UKI_SECTIONS: tuple[str, ...] = (
    ".linux",
    ".osrel",
    ".cmdline",
    ".initrd",
    ".ucode",
    ".splash",
    ".dtb",
    ".uname",
    ".sbat",
    ".pcrsig",
    ".pcrpkey",
    ".profile",
    ".dtbauto",
    ".hwids",
    ".efifw",
)
UNMEASURED_SECTIONS = frozenset({".pcrsig"})

# Boot phase words systemd's own units extend (systemd-pcrphase*.service), in boot order.
KNOWN_PHASES: tuple[str, ...] = ("enter-initrd", "leave-initrd", "sysinit", "ready", "shutdown", "final")

# What systemd-measure (and so ukify) signs when no phase is given: the initrd, early boot, later
# boot and runtime; not the phases before the initrd or at shutdown.
DEFAULT_PHASES: tuple[str, ...] = (
    "enter-initrd",
    "enter-initrd:leave-initrd",
    "enter-initrd:leave-initrd:sysinit",
    "enter-initrd:leave-initrd:sysinit:ready",
)
# A policy only the initrd can satisfy (ukify --sign-initrd-pcrs): PCR 11 at enter-initrd, signed with
# the policy reference "initrd". systemd 262's systemd-tpm2-setup needs it to initialize its NvPCRs
# (TPM NV indexes it extends like PCRs) and refuses to without it.
INITRD_PHASES: tuple[str, ...] = ("enter-initrd",)
INITRD_POLICY_REF = "initrd"

# TPM2 algorithm identifiers (TPM_ALG_ID) of the PCR banks systemd-measure supports.
BANK_ALG_IDS: dict[str, int] = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}

TPM_CC_POLICY_PCR = 0x0000017F
# Size of the PCR bitmap in a TPMS_PCR_SELECTION (24 PCRs), as TPMs and systemd use.
PCR_SELECT_BYTES = 3


def _bank(name: str) -> str:
    bank = name.lower()
    if bank not in BANK_ALG_IDS:
        raise HadronError(
            f"unknown TPM PCR bank {name!r}",
            hint=f"use one of {', '.join(BANK_ALG_IDS)}",
        )
    return bank


def normalize_banks(banks: Iterable[str]) -> list[str]:
    """Lower-case, drop duplicates and sort into TPM algorithm order (the order systemd prints)."""
    unique = {_bank(b) for b in banks}
    if not unique:
        raise HadronError("no TPM PCR bank given", hint="pass at least one bank, e.g. sha256")
    return sorted(unique, key=BANK_ALG_IDS.__getitem__)


def phase_words(path: str | Sequence[str]) -> list[str]:
    """The words of a phase path: ``"enter-initrd:leave-initrd"`` or a sequence of words.

    Empty words are dropped (``"ready::"`` is ``["ready"]``), as systemd-measure does.
    """
    words = path.split(":") if isinstance(path, str) else list(path)
    for w in words:
        if not isinstance(w, str) or ":" in w:
            raise HadronError(f"invalid boot phase word {w!r} in {path!r}", hint="phase words are strings without ':'")
    return [w for w in words if w]


def normalize_phases(phases: Iterable[str]) -> list[str]:
    """Phase paths with empty words dropped, without duplicates, sorted: systemd-measure's order."""
    if isinstance(phases, str):
        phases = [phases]
    out = sorted({":".join(phase_words(p)) for p in phases})
    if not out:
        raise HadronError("no boot phase given", hint=f"the default set is {', '.join(DEFAULT_PHASES)}")
    return out


def measured_sections(
    sections: Mapping[str, bytes], known: Iterable[str] | None = None
) -> list[tuple[str, bytes]]:
    """The (name, contents) pairs a stub extends into PCR 11, in measurement order.

    ``known`` is the set of section names the stub knows (``None``: every UKI section). Sections
    the stub does not know, ``.pcrsig`` and empty sections are left out. Names that are not UKI
    sections raise HadronError, so a typo does not silently change the prediction.
    """
    unknown = sorted(set(sections) - set(UKI_SECTIONS))
    if unknown:
        raise HadronError(
            f"not UKI sections: {', '.join(unknown)}",
            hint=f"UKI section names are {', '.join(UKI_SECTIONS)} (with the leading dot)",
        )
    known_set = set(UKI_SECTIONS) if known is None else set(known)
    return [
        (name, bytes(sections[name]))
        for name in UKI_SECTIONS
        if name in sections and name in known_set and name not in UNMEASURED_SECTIONS and len(sections[name]) > 0
    ]


def _extend(bank: str, pcr: bytes, data: bytes) -> bytes:
    return hashlib.new(bank, pcr + hashlib.new(bank, data).digest()).digest()


def _pcr_after_sections(sections: Sequence[tuple[str, bytes]], bank: str) -> bytes:
    pcr = bytes(hashlib.new(bank).digest_size)
    for name, data in sections:
        pcr = _extend(bank, pcr, name.encode("ascii") + b"\0")
        pcr = _extend(bank, pcr, data)
    return pcr


def _pcr_after_phase(base: bytes, words: Sequence[str], bank: str) -> bytes:
    pcr = base
    for w in words:
        pcr = _extend(bank, pcr, w.encode("utf-8"))
    return pcr


def predict_pcr11(
    sections: Mapping[str, bytes],
    phases: str | Sequence[str] = (),
    bank: str = "sha256",
    *,
    known: Iterable[str] | None = None,
) -> bytes:
    """PCR 11 after a stub measured ``sections`` and the boot reached the phase path ``phases``.

    ``phases`` is one phase path: a colon-separated string (``"enter-initrd:leave-initrd"``) or
    the sequence of its words; empty means right after the stub ran.
    """
    bank = _bank(bank)
    base = _pcr_after_sections(measured_sections(sections, known), bank)
    return _pcr_after_phase(base, phase_words(phases), bank)


def calculate(
    sections: Mapping[str, bytes],
    phases: Iterable[str] = DEFAULT_PHASES,
    banks: Iterable[str] = ("sha256",),
    *,
    known: Iterable[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """The expected PCR 11 values in the form ``systemd-measure calculate --json`` prints."""
    out: dict[str, list[dict[str, Any]]] = {}
    for bank, values in _expected_values(sections, phases, banks, known).items():
        out[bank] = [{**({"phase": path} if path else {}), "pcr": KERNEL_BOOT_PCR, "hash": value.hex()}
                     for path, value in values]
    return out


def _expected_values(
    sections: Mapping[str, bytes], phases: Iterable[str], banks: Iterable[str], known: Iterable[str] | None
) -> dict[str, list[tuple[str, bytes]]]:
    """bank → [(phase path, PCR 11 value)], banks and paths in systemd-measure's order."""
    measured = measured_sections(sections, known)
    paths = normalize_phases(phases)
    out: dict[str, list[tuple[str, bytes]]] = {}
    for bank in normalize_banks(banks):
        base = _pcr_after_sections(measured, bank)
        out[bank] = [(path, _pcr_after_phase(base, phase_words(path), bank)) for path in paths]
    return out


def policy_digest(pcr_values: Mapping[int, bytes] | bytes, bank: str = "sha256") -> bytes:
    """The TPM2 PolicyPCR digest (SHA-256 session) of a fresh policy session for these PCR values.

    ``pcr_values`` maps PCR index to its value in ``bank``; plain bytes mean PCR 11.
    """
    bank = _bank(bank)
    values = {KERNEL_BOOT_PCR: pcr_values} if isinstance(pcr_values, bytes | bytearray) else dict(pcr_values)
    if not values:
        raise HadronError("no PCR value given for the policy digest")
    size = hashlib.new(bank).digest_size
    bitmap = bytearray(PCR_SELECT_BYTES)
    for index, value in values.items():
        if not 0 <= index < PCR_SELECT_BYTES * 8:
            raise HadronError(f"PCR index {index} is out of range", hint="TPM2 PCRs are numbered 0-23")
        if len(value) != size:
            raise HadronError(f"PCR {index} value has {len(value)} bytes, a {bank} PCR has {size}")
        bitmap[index // 8] |= 1 << (index % 8)
    # TPML_PCR_SELECTION with one TPMS_PCR_SELECTION: count, hash algorithm, sizeofSelect, bitmap.
    selection = struct.pack(">IHB", 1, BANK_ALG_IDS[bank], PCR_SELECT_BYTES) + bytes(bitmap)
    pcr_digest = hashlib.sha256(b"".join(bytes(values[i]) for i in sorted(values))).digest()
    return hashlib.sha256(bytes(32) + struct.pack(">I", TPM_CC_POLICY_PCR) + selection + pcr_digest).digest()


def _where(data: bytes | Path, what: str) -> str:
    return str(data) if isinstance(data, Path) else f"the {what}"


def _read_key_input(data: bytes | Path, what: str) -> tuple[bytes, str]:
    if isinstance(data, Path):
        try:
            return data.read_bytes(), str(data)
        except OSError as e:
            raise HadronError(f"cannot read the {what} {data}: {e.strerror}", hint="check the path") from e
    return bytes(data), _where(data, what)


def load_pcr_private_key(private_key_pem: bytes | Path) -> rsa.RSAPrivateKey:
    """Load an unencrypted PEM RSA private key (the form systemd-measure and ukify take)."""
    data, where = _read_key_input(private_key_pem, "PCR signing private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise HadronError(f"{where} is encrypted", hint="PCR signing needs an unencrypted PEM private key") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise HadronError(f"{where} is not a PEM private key", hint="pass a PEM file (BEGIN PRIVATE KEY)") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise HadronError(f"{where} is not an RSA key", hint="PCR signatures use RSA keys (e.g. RSA-2048)")
    return key


def load_pcr_public_key(public_key_pem: bytes | Path) -> rsa.RSAPublicKey:
    """Load a PEM RSA public key (SubjectPublicKeyInfo, BEGIN PUBLIC KEY)."""
    data, where = _read_key_input(public_key_pem, "PCR signing public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise HadronError(f"{where} is not a PEM public key", hint="pass a PEM file (BEGIN PUBLIC KEY)") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise HadronError(f"{where} is not an RSA key", hint="PCR signatures use RSA keys (e.g. RSA-2048)")
    return key


def load_pcr_keypair(
    private_key_pem: bytes | Path, public_key_pem: bytes | Path | None = None
) -> tuple[rsa.RSAPrivateKey, rsa.RSAPublicKey]:
    """Load the signing key pair; the public key defaults to the private key's and must match it."""
    private = load_pcr_private_key(private_key_pem)
    if public_key_pem is None:
        return private, private.public_key()
    public = load_pcr_public_key(public_key_pem)
    if public.public_numbers() != private.public_key().public_numbers():
        raise HadronError(
            f"{_where(public_key_pem, 'PCR signing public key')} is not the public key of "
            f"{_where(private_key_pem, 'PCR signing private key')}",
            hint="pass the public key generated together with the private key, or leave it out to derive it",
        )
    return private, public


def public_key_pem(public_key: rsa.RSAPublicKey) -> bytes:
    """The key as PEM SubjectPublicKeyInfo, the form .pcrpkey carries."""
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_fingerprint(public_key: rsa.RSAPublicKey) -> str:
    """``pkfp``: hex SHA-256 of the PKCS#1 RSAPublicKey DER encoding."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    return hashlib.sha256(der).hexdigest()


def policy_ref_digest(policy_ref: str) -> bytes:
    """The TPM2_PolicyAuthorize policyRef systemd uses for a policy reference string: its SHA-256, or
    nothing for no reference."""
    return hashlib.sha256(policy_ref.encode()).digest() if policy_ref else b""


def sign_policy(
    sections: Mapping[str, bytes],
    private_key_pem: bytes | Path,
    public_key_pem: bytes | Path | None = None,
    phases: Iterable[str] = DEFAULT_PHASES,
    banks: Iterable[str] = ("sha256",),
    *,
    known: Iterable[str] | None = None,
    signature_hash: Literal["sha256", "bank"] = "sha256",
    policy_ref: str = "",
) -> dict[str, list[dict[str, Any]]]:
    """The .pcrsig JSON object (as ``systemd-measure sign`` prints it) for these sections.

    The keys are PEM bytes or paths to PEM files; a public key that does not belong to the private
    key raises HadronError (systemd-measure would sign with a fingerprint of the wrong key).
    ``signature_hash="bank"`` reproduces systemd 252, which signed each bank's policy digest with
    that bank's hash algorithm; current systemd signs with SHA-256 for every bank and verifies
    that way, so the default is what a systemd 262 system unlocks with. ``policy_ref`` (systemd-measure
    ``--policyref=``) signs the policy digest followed by the reference's digest and names it in the
    entry's ``ref``: only a TPM2_PolicyAuthorize with that reference accepts it.
    """
    private, public = load_pcr_keypair(private_key_pem, public_key_pem)
    fingerprint = public_key_fingerprint(public)
    out: dict[str, list[dict[str, Any]]] = {}
    for bank, values in _expected_values(sections, phases, banks, known).items():
        entries: list[dict[str, Any]] = []
        for _path, value in values:
            pol = policy_digest({KERNEL_BOOT_PCR: value}, bank)
            sig = private.sign(pol + policy_ref_digest(policy_ref), padding.PKCS1v15(),
                               _sig_hash(bank if signature_hash == "bank" else "sha256"))
            sig_b64 = base64.b64encode(sig).decode()
            ref = {"ref": policy_ref} if policy_ref else {}
            entries.append({"pcrs": [KERNEL_BOOT_PCR], "pkfp": fingerprint, **ref, "pol": pol.hex(), "sig": sig_b64})
        out[bank] = entries
    return out


def _sig_hash(name: str) -> hashes.HashAlgorithm:
    algorithms: dict[str, hashes.HashAlgorithm] = {
        "sha1": hashes.SHA1(), "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512(),
    }
    return algorithms[name]


def combine_signatures(*objs: Mapping[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """One .pcrsig object from several (as ukify combines its signing groups): each bank's entries
    in order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        for bank, entries in obj.items():
            out.setdefault(bank, []).extend(entries)
    return out


def to_json(obj: Mapping[str, Any]) -> bytes:
    """Compact JSON, byte-identical to systemd's ``--json=short`` output (without its newline)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def verify_policy_signature(
    pcrsig: Mapping[str, Any],
    public_key: bytes | Path | rsa.RSAPublicKey,
    signature_hash: Literal["sha256", "bank"] = "sha256",
) -> int:
    """Check every signature in a .pcrsig object against ``public_key``; return how many were checked.

    Raises HadronError naming the first entry that does not verify or has a foreign fingerprint.
    """
    key = public_key if isinstance(public_key, rsa.RSAPublicKey) else load_pcr_public_key(public_key)
    fingerprint = public_key_fingerprint(key)
    count = 0
    for bank_key, entries in pcrsig.items():
        bank = _bank(bank_key)
        for i, entry in enumerate(entries):
            where = f".pcrsig {bank}[{i}]"
            try:
                pol = bytes.fromhex(entry["pol"]) + policy_ref_digest(entry.get("ref", ""))
                sig = base64.b64decode(entry["sig"], validate=True)
                pkfp = entry["pkfp"]
            except (KeyError, TypeError, ValueError) as e:
                raise HadronError(f"{where} is malformed: {e}") from e
            if pkfp != fingerprint:
                raise HadronError(f"{where} was made with another key (pkfp {pkfp})")
            try:
                key.verify(sig, pol, padding.PKCS1v15(), _sig_hash(bank if signature_hash == "bank" else "sha256"))
            except InvalidSignature as e:
                raise HadronError(f"{where}: the signature does not verify") from e
            count += 1
    return count
