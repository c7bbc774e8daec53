"""The image signing keys of a key directory (the one ``hadron keys`` makes; $HADRON_KEYS or ./keys).

    provenance.key  provenance.pub    ECDSA P-256 pair (PEM) that signs the SLSA provenance of every
                                      image (a DSSE envelope) and, through it, the image's SBOM
    gnupg/                            GnuPG home holding the OpenPGP key that signs image manifests
                                      ("simple signing", what skopeo and podman check with signedBy)
    image-signing.gpg                 that key's public keyring: the keyPath of a signedBy policy
    image-signing.fpr                 its fingerprint

The private keys lie unencrypted on disk: for test machines and builders whose disk is theirs alone.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from securesystemslib.signer import CryptoSigner, SSlibKey

from hadron import runner
from hadron.errors import HadronError

PROVENANCE_KEY = "provenance.key"
PROVENANCE_PUB = "provenance.pub"
GNUPG_HOME = "gnupg"
IMAGE_KEYRING = "image-signing.gpg"
IMAGE_FINGERPRINT = "image-signing.fpr"
GPG_IDENTITY = "Hadron image signing TEST KEY <image-signing@hadron.invalid>"
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("gpg", "gpgconf")


def project_dir(project: Path) -> Path:
    """Where builds look for the signing keys: $HADRON_KEYS, else keys/ in the project."""
    return Path(os.environ["HADRON_KEYS"]) if os.environ.get("HADRON_KEYS") else project / "keys"


@dataclass(frozen=True)
class ImageKeys:
    directory: Path

    @property
    def provenance_key(self) -> Path:
        return self.directory / PROVENANCE_KEY

    @property
    def provenance_pub(self) -> Path:
        return self.directory / PROVENANCE_PUB

    @property
    def gnupg(self) -> Path:
        return self.directory / GNUPG_HOME

    @property
    def keyring(self) -> Path:
        return self.directory / IMAGE_KEYRING

    @property
    def fingerprint(self) -> str:
        return (self.directory / IMAGE_FINGERPRINT).read_text().strip()

    def has_provenance_key(self) -> bool:
        return self.provenance_key.is_file()

    def has_image_key(self) -> bool:
        return (self.directory / IMAGE_FINGERPRINT).is_file() and self.gnupg.is_dir()

    def signer(self) -> CryptoSigner:
        """The provenance signer (securesystemslib), from provenance.key."""
        try:
            key = serialization.load_pem_private_key(self.provenance_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise HadronError(f"{self.provenance_key}: not a readable unencrypted PEM private key ({e})",
                              hint="make the image signing keys again: hadron keys image-signing --force") from None
        return CryptoSigner(key)


def public_key(path: Path) -> SSlibKey:
    """A provenance public key (PEM) as securesystemslib takes it."""
    try:
        pub = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise HadronError(f"{path}: not a readable PEM public key ({e})",
                          hint="pass the provenance.pub of the key directory that signed the image") from None
    return SSlibKey.from_crypto(pub)


@contextmanager
def gpg_home(home: Path) -> Iterator[dict[str, str]]:
    """The environment that points gpg (and skopeo's gpgme) at ``home``; the gpg-agent it may start is
    stopped on the way out."""
    env = {"GNUPGHOME": str(home)}
    try:
        yield env
    finally:
        runner.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], what="stopping gpg-agent",
                   check=False)


def generate(directory: Path, *, force: bool = False) -> ImageKeys:
    """Make the image signing keys in ``directory`` (which may hold other keys already). They are made
    in a staging directory inside it and moved into place at the end: a failure leaves no half key set."""
    ks = ImageKeys(directory)
    if (ks.has_provenance_key() or ks.gnupg.exists()) and not force:
        raise HadronError(f"{directory} already holds image signing keys",
                          hint="keep them, or pass --force to replace them (images signed before stay "
                               "checkable only with the old public keys)")
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / f".image-signing.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        _generate_in(ImageKeys(staging))
        for name in (GNUPG_HOME, PROVENANCE_KEY, PROVENANCE_PUB, IMAGE_KEYRING, IMAGE_FINGERPRINT):
            old = directory / name
            if old.is_dir():
                shutil.rmtree(old)
            os.replace(staging / name, old)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ks


def _generate_in(ks: ImageKeys) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    fd = os.open(ks.provenance_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ks.provenance_pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                serialization.PublicFormat.SubjectPublicKeyInfo))
    ks.gnupg.mkdir(mode=0o700)
    with gpg_home(ks.gnupg):
        gpg = ["gpg", "--homedir", str(ks.gnupg), "--batch", "--no-tty"]
        runner.run([*gpg, "--pinentry-mode", "loopback", "--passphrase", "", "--quick-gen-key", GPG_IDENTITY,
                    "ed25519", "sign", "never"], what="generating the image signing OpenPGP key")
        listing = runner.run([*gpg, "--with-colons", "--list-secret-keys"], what="listing the OpenPGP key").stdout
        fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
        runner.run([*gpg, "--output", str(ks.keyring), "--export", fpr], what="exporting the OpenPGP public key")
    (ks.directory / IMAGE_FINGERPRINT).write_text(fpr + "\n")
