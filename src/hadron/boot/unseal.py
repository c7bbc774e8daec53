"""The trusted path's unseal matrix: a secret the booted system seals with its TPM to the UKI's signed
PCR 11 policy, and the boots that must and must not get it back.

The booted system seals with ``systemd-creds encrypt --with-key=tpm2-with-public-key
--tpm2-public-key=… --tpm2-public-key-pcrs=11`` (plain ``--with-key=tpm2`` ignores the public key and
binds to no PCR at all): the credential is bound to the PCR public key, not to PCR values, so any
UKI whose PCR 11 policy that key signed unseals it in the state the policy names, and nothing else
does. One swtpm state carries the TPM from boot to boot; the sealed credential travels from the
first boot's console into the next disks' root file systems. Each boot runs a probe script from the
boot-check unit (qemu.PROBE) and reports one line per case:

    signed-boot      our signed UKI, right after sealing            unsealed
    after-pcrextend  the same boot after PCR 11 is extended         refused
    renewed-uki      a new UKI (another command line), same key     unsealed
    other-pcr-key    a UKI whose policy another PCR key signed      refused
    no-tpm           our signed UKI on a machine without a TPM      refused (systemd-creds says why)
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from hadron.boot import measure, qemu, secureboot
from hadron.errors import HadronError

# Where the probe finds its inputs in the root file system (written by the host for each boot).
SECRET = "etc/hadron-probe/secret"
CREDENTIAL = "etc/hadron-probe/secret.cred"
# The credential's embedded name: decrypt refuses a credential renamed to something else.
CRED_NAME = "hadron-probe"
# The PCR public key and signature the stub hands the booted system (systemd's tmpfiles copy them
# from the initrd's /.extra); the same paths systemd-creds searches by default.
PCR_PUBLIC_KEY = "/run/systemd/tpm2-pcr-public-key.pem"

# POSIX shell pieces of the probe. `unseal CASE` decrypts and prints "CASE unsealed SHA256" or
# "CASE refused MESSAGE" (systemd-creds' own error, on one line).
_PRELUDE = r"""#!/bin/sh
set -u
cred=/CREDENTIAL
unseal() {
  if out=$(systemd-creds decrypt --name=CRED_NAME "$cred" - 2>/run/hadron-probe.err); then
    echo "unseal $1 unsealed $(printf %s "$out" | sha256sum | cut -d' ' -f1)"
  else
    echo "unseal $1 refused $(tr '\n' ' ' < /run/hadron-probe.err)"
  fi
}
"""
_SEAL = r"""cred=/run/hadron-probe.cred
if systemd-creds encrypt --with-key=tpm2-with-public-key --tpm2-public-key=PCR_PUBLIC_KEY --tpm2-public-key-pcrs=11 \
    --name=CRED_NAME /SECRET "$cred" 2>/run/hadron-probe.err; then
  echo "seal ok"
  sed 's/^/cred /' "$cred"
else
  echo "seal failed $(tr '\n' ' ' < /run/hadron-probe.err)"
fi
unseal signed-boot
if /usr/lib/systemd/systemd-pcrextend --pcr=11 hadron-probe-tamper 2>/run/hadron-probe.err; then
  echo "pcrextend ok $(cat /sys/class/tpm/tpm0/pcr-sha256/11)"
else
  echo "pcrextend failed $(tr '\n' ' ' < /run/hadron-probe.err)"
fi
unseal after-pcrextend
"""


def _script(body: str) -> str:
    return (_PRELUDE + body).replace("/CREDENTIAL", "/" + CREDENTIAL).replace("CRED_NAME", CRED_NAME) \
        .replace("PCR_PUBLIC_KEY", PCR_PUBLIC_KEY).replace("/SECRET", "/" + SECRET)


def seal_probe() -> str:
    """The first boot's probe: seal, unseal, extend PCR 11, try again."""
    return _script(_SEAL)


def unseal_probe(case: str) -> str:
    """A later boot's probe: unseal the credential the first boot sealed."""
    return _script(f"unseal {case}\n")


# What systemd-creds' terse refusals mean here (errno texts of tpm2_unseal's documented errors).
EXPLANATIONS = (
    ("Device not a stream", "no signature in the booted UKI's .pcrsig matches this PCR 11 value and PCR public "
     "key: PCR 11 was extended with something the policy does not sign, or the UKI was signed with another "
     "PCR key. Boot a UKI signed with the key the secret was sealed to, or seal it again for this key"),
    ("/dev/tpmrm0", "the machine has no TPM 2.0 device: give it one (QEMU: swtpm and -device tpm-crb), "
     "or keep secrets that need no TPM"),
    ("different TPM", "the secret was sealed by another TPM: seal it again on this machine"),
)


def explain(detail: str) -> str:
    """A sentence saying what a refusal means and what to do, or "" when it is not a known one."""
    return next((text for marker, text in EXPLANATIONS if marker in detail), "")


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # "unsealed" or "refused"
    result: str  # "unsealed", "refused", "mismatch" (unsealed something else) or "missing"
    detail: str

    @property
    def ok(self) -> bool:
        return self.result == self.expected

    def to_json(self) -> dict[str, Any]:
        return {"case": self.name, "expected": self.expected, "result": self.result, "ok": self.ok,
                "detail": self.detail, "meaning": explain(self.detail) if self.result == "refused" else ""}


EXPECTED = {"signed-boot": "unsealed", "after-pcrextend": "refused", "renewed-uki": "unsealed",
            "other-pcr-key": "refused", "no-tpm": "refused"}


def parse_case(res: qemu.BootResult, name: str, secret: str) -> Case:
    """The probe's verdict on ``name`` from a boot's console."""
    want = hashlib.sha256(secret.encode()).hexdigest()
    for line in res.reported("PROBE"):
        words = line.split(" ", 3)
        if len(words) >= 3 and words[0] == "unseal" and words[1] == name:
            detail = words[3] if len(words) > 3 else ""
            if words[2] == "unsealed":
                return Case(name, EXPECTED[name], "unsealed" if detail == want else "mismatch", detail)
            return Case(name, EXPECTED[name], "refused", detail.strip() or "(no message)")
    return Case(name, EXPECTED[name], "missing", "the probe reported nothing for this case: see the console")


def sealed_credential(res: qemu.BootResult) -> bytes:
    """The credential the first boot sealed, as systemd-creds wrote it (base64 text)."""
    seal = [ln for ln in res.reported("PROBE") if ln.startswith("seal ")]
    if not seal or seal[0] != "seal ok":
        raise HadronError("the booted system could not seal the secret to the signed PCR 11 policy: "
                          + (seal[0][5:] if seal else "the probe reported nothing"),
                          hint="the console above has systemd-creds' messages; the image needs systemd "
                               "built with tpm2 and openssl, and tpm2-tss")
    text = "\n".join(ln[5:] for ln in res.reported("PROBE") if ln.startswith("cred ")) + "\n"
    try:
        base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as e:
        raise HadronError(f"the sealed credential read from the console is not base64 ({e})") from None
    return text.encode()


def other_pcr_keys(keys: secureboot.KeySet, directory: Path) -> secureboot.KeySet:
    """``keys`` with the PCR policy pair replaced by a new one (the Secure Boot keys stay): a UKI
    signed with it passes Secure Boot but carries a policy the sealed secret does not trust."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private, public = directory / secureboot.PCR_PRIVATE_KEY, directory / secureboot.PCR_PUBLIC_KEY
    private.write_bytes(secureboot.private_pem(key))
    private.chmod(0o600)
    public.write_bytes(measure.public_key_pem(key.public_key()))
    return dataclasses.replace(keys, pcr_private_key=private, pcr_public_key=public)


# One boot of the matrix: (probe script, files added to the root, keys, command-line extra, TPM?)
Boot = Callable[[str, dict[str, bytes], secureboot.KeySet, str, bool], qemu.BootResult]


@dataclass
class Matrix:
    cases: list[Case]
    boots: dict[str, float]  # boot name -> seconds to the check report

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases) and [c.name for c in self.cases] == list(EXPECTED)


def new_secret() -> str:
    return secrets.token_hex(32)


def later_boots(boot: Boot, keys: secureboot.KeySet, work: Path, secret: str, credential: bytes,
                first: qemu.BootResult) -> Matrix:
    """Given the first boot (which sealed and reported signed-boot and after-pcrextend), run the
    other three boots and collect every case."""
    cases = [parse_case(first, "signed-boot", secret), parse_case(first, "after-pcrextend", secret)]
    boots = {"signed": first.seconds_to_check or 0.0}
    files = {CREDENTIAL: credential}
    plan = [("renewed-uki", keys, "hadron.probe=renewed-uki", True),
            ("other-pcr-key", other_pcr_keys(keys, work / "other-pcr-key"), "", True),
            ("no-tpm", keys, "", False)]
    for name, ks, extra, tpm in plan:
        res = boot(unseal_probe(name), files, ks, extra, tpm)
        boots[name] = res.seconds_to_check or 0.0
        if res.state is None:
            cases.append(Case(name, EXPECTED[name], "missing",
                              "the system did not reach the boot check: " + " ".join(res.console[-400:].split())))
        else:
            cases.append(parse_case(res, name, secret))
    return Matrix(cases, boots)
