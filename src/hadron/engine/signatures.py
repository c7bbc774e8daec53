"""Upstream signatures: a source file's detached OpenPGP signature, checked against pinned keys.

A recipe's ``sources[].signature`` names upstream's signature file and the fingerprints of the keys
allowed to have made it. The keys are files in the repository, ``keys/<FINGERPRINT>.asc`` next to
the recipe directory (``distro/keys/`` for ``distro/packages/``); nothing is looked up on a key
server. Verification runs Sequoia's ``sqv`` under its current policy, or GnuPG's ``gpgv`` when the
recipe states why an old key (SHA-1 self-signatures, DSA-1024) has to be accepted (``legacy``).
Either way the signer must be one of the pinned keys. Fetching calls :func:`verify` before a
downloaded file is admitted to the source store (:mod:`hadron.engine.fetch`).
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from hadron import runner
from hadron.engine.recipe import Signature
from hadron.errors import FetchError

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("sqv", "gpgv", "gpg")

# gpgv status keywords that refuse a signature even when gpgv itself exits 0.
_REFUSED = {
    "BADSIG": "the signature does not match the file",
    "EXPKEYSIG": "the signing key has expired",
    "REVKEYSIG": "the signing key was revoked",
    "EXPSIG": "the signature has expired",
    "ERRSIG": "the signature could not be checked",
    "NO_PUBKEY": "the signing key is not among the pinned keys",
}


@dataclass(frozen=True)
class Verified:
    """Who made a good signature over a file, and how that was checked."""

    signer: str  # primary key fingerprint, one of the recipe's pinned keys
    tool: str  # "sqv" or "gpgv"
    signature_sha256: str

    def describe(self) -> str:
        return f"signed by {self.signer} ({self.tool})"


def key_file(keys_dir: Path, fingerprint: str) -> Path:
    return keys_dir / f"{fingerprint}.asc"


def verify(spec: Signature, data: Path, signature: bytes, keys_dir: Path, *, where: str, tmp: Path) -> Verified:
    """Check ``signature`` over ``data`` (or over the tar inside it) with the keys ``spec`` pins.

    Raises FetchError saying what failed, for which file, and what to do."""
    keyrings = [key_file(keys_dir, fpr) for fpr in spec.keys]
    missing = [k for k in keyrings if not k.is_file()]
    if missing:
        raise FetchError(
            f"{where}: signature key file(s) missing: {', '.join(map(str, missing))}",
            hint="add upstream's public key, exported in ASCII armour, under the fingerprint the recipe pins",
        )
    with _scratch(tmp) as scratch:
        sig = scratch / "signature"
        sig.write_bytes(signature)
        target = data
        if spec.over == "uncompressed":
            target = scratch / "uncompressed"
            _decompress(data, target, where)
        if spec.legacy is None:
            signer = _sqv(keyrings, sig, target, spec, where)
            tool = "sqv"
        else:
            signer = _gpgv(keyrings, sig, target, spec, where, scratch)
            tool = "gpgv"
    return Verified(signer=signer, tool=tool, signature_sha256=hashlib.sha256(signature).hexdigest())


def _sqv(keyrings: list[Path], sig: Path, target: Path, spec: Signature, where: str) -> str:
    argv: list[str | Path] = ["sqv"]
    for k in keyrings:
        argv += ["--keyring", k]
    res = runner.run([*argv, sig, target], what="sqv", check=False)
    signers = [line.strip().upper() for line in res.stdout.splitlines() if line.strip()]
    good = [s for s in signers if s in spec.keys]
    if res.returncode != 0 or not good:
        detail = (res.stderr.strip() or res.stdout.strip() or f"exit status {res.returncode}")[-800:]
        raise FetchError(
            f"{where}: upstream signature {spec.url} does not verify with the pinned key(s) "
            f"{', '.join(spec.keys)}:\n    {detail}",
            hint="the file was discarded. A changed key or file needs a deliberate recipe update; if the "
            "key is old (SHA-1 self-signatures, DSA-1024) and you accept that, say why in `legacy`",
        )
    return good[0]


def _gpgv(keyrings: list[Path], sig: Path, target: Path, spec: Signature, where: str, scratch: Path) -> str:
    argv: list[str | Path] = ["gpgv", "--status-fd", "1"]
    for i, k in enumerate(keyrings):
        binary = scratch / f"key{i}.gpg"
        # gpgv reads binary keyrings only; gpg --dearmor is a pure format conversion.
        runner.run(["gpg", "--homedir", scratch, "--batch", "--quiet", "--yes", "--output", binary,
                    "--dearmor", k], what=f"gpg --dearmor {k.name}")
        argv += ["--keyring", binary]
    res = runner.run([*argv, sig, target], what="gpgv", check=False)
    status = [line.split()[1:] for line in res.stdout.splitlines() if line.startswith("[GNUPG:] ")]
    refused = [f"{_REFUSED[s[0]]} ({' '.join(s)})" for s in status if s and s[0] in _REFUSED]
    valid = [s for s in status if s and s[0] == "VALIDSIG"]
    # VALIDSIG <sig-key fpr> <date> <ts> <expire> <version> <reserved> <pk algo> <hash algo> <class> <primary fpr>
    signers = [s[-1].upper() for s in valid if len(s) >= 11]
    good = [s for s in signers if s in spec.keys]
    if res.returncode != 0 or refused or not good:
        detail = "; ".join(refused) or (res.stderr.strip() or f"exit status {res.returncode}")[-800:]
        raise FetchError(
            f"{where}: upstream signature {spec.url} does not verify with the pinned key(s) "
            f"{', '.join(spec.keys)} (gpgv):\n    {detail}",
            hint="the file was discarded. A changed key or file needs a deliberate recipe update",
        )
    return good[0]


def _decompress(src: Path, dest: Path, where: str) -> None:
    with src.open("rb") as f:
        head = f.read(6)
    openers: dict[bytes, ModuleType] = {b"\xfd7zXZ": lzma, b"\x1f\x8b": gzip, b"BZh": bz2}
    opener = next((o for magic, o in openers.items() if head.startswith(magic)), None)
    if opener is None:
        raise FetchError(
            f"{where}: the signature covers the uncompressed file, but this file is not xz, gzip or bzip2",
            hint="set `over = \"file\"` if upstream signs the file as published",
        )
    try:
        with opener.open(src, "rb") as stream, dest.open("wb") as out:
            shutil.copyfileobj(stream, out, 1 << 20)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise FetchError(f"{where}: cannot decompress the file to check its signature: {e}") from None


@contextmanager
def _scratch(tmp: Path) -> Iterator[Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="sig-", dir=tmp))
    try:
        os.chmod(d, 0o700)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
