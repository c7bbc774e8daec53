"""A binary cache in an OCI registry: package outputs as signed artifacts tagged by cache key.

One output travels as one OCI file artifact (``application/vnd.hadron.output.v1``) tagged with
its 64-hex cache key, carried by skopeo:

    runtime.tar  dev.tar     the output's trees (reproducible tars: sorted, uid 0, clamped times)
    manifest.json            the builder's manifest: every file with mode, size and sha256
    build.log
    signature.json           {"signer": NAME, "signature": base64, "signed": {"key": KEY, "files": {name: sha256}}}

The signature is Ed25519 over ``hadron-output-v1`` and the canonical JSON of ``signed``, made with
the builder's secret key (``NAME:base64`` seed, as Nix keys are written). A consumer accepts an
artifact only when it is signed by a key it trusts, for the key it asked for, every file's sha256
matches the signed list, the manifest is for that key and its content digest, and the unpacked trees
are exactly the manifest's files; then the output is renamed into the local cache whole. Anything
else is refused with the reason, and the package is built locally.
"""

from __future__ import annotations

import base64
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from hadron import runner
from hadron.engine.cache import MANIFEST, OUTPUTS, Cache, Output, content_digest, diff_manifest, scan_outputs
from hadron.engine.fetch import file_sha256
from hadron.errors import HadronError
from hadron.image import oci
from hadron.layout import remove_tree

ARTIFACT_TYPE = "application/vnd.hadron.output.v1"
FILE_MEDIA = "application/vnd.hadron.output.file.v1"
SIGNATURE = "signature.json"
LOG = "build.log"
FILES = (*(f"{o}.tar" for o in OUTPUTS), MANIFEST, LOG)
DOMAIN = b"hadron-output-v1\n"
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("skopeo",)
MISSING = ("manifest unknown", "not found", "name unknown")


class Refused(HadronError):
    """An artifact exists for the key but may not be used."""


# ------------------------------------------------------------------------------ keys

@dataclass(frozen=True)
class SigningKey:
    name: str
    seed: bytes  # 32 bytes

    def public(self) -> str:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        raw = Ed25519PrivateKey.from_private_bytes(self.seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def sign(self, data: bytes) -> str:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return base64.b64encode(Ed25519PrivateKey.from_private_bytes(self.seed).sign(data)).decode()


def _split(text: str, what: str) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
    except ValueError:
        raw = b""
    if not sep or not name or len(raw) != 32:
        raise HadronError(f"{what}: not a key of the form NAME:BASE64 (32 bytes)")
    return name, raw


def generate_key(name: str, directory: Path) -> tuple[Path, Path]:
    """A new signing key: ``NAME.secret`` (mode 0600) and ``NAME.public``, both ``NAME:base64``."""
    if not name or ":" in name or "/" in name:
        raise HadronError(f"{name!r} is not a key name", hint="use letters, digits, dots and dashes")
    directory.mkdir(parents=True, exist_ok=True)
    secret, public = directory / f"{name}.secret", directory / f"{name}.public"
    if secret.exists():
        raise HadronError(f"{secret} already exists", hint="remove it first, or choose another name")
    key = SigningKey(name, os.urandom(32))
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{name}:{base64.b64encode(key.seed).decode()}\n")
    public.write_text(key.public() + "\n")
    return secret, public


def load_signing_key(path: Path) -> SigningKey:
    try:
        text = path.read_text()
    except OSError as e:
        raise HadronError(f"cannot read the cache signing key {path}: {e.strerror}",
                          hint="make one with `hadron cache keygen NAME`") from None
    name, seed = _split(text, str(path))
    return SigningKey(name, seed)


def parse_trusted(keys: Iterable[str]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for k in keys:
        name, raw = _split(k, f"[cache] trusted_keys entry {k[:40]!r}")
        out[name] = raw
    return out


def _payload(key: str, files: dict[str, str]) -> bytes:
    return DOMAIN + json.dumps({"files": dict(sorted(files.items())), "key": key}, sort_keys=True,
                               separators=(",", ":")).encode()




# ------------------------------------------------------------------------------ the remote

@dataclass(frozen=True)
class Pulled:
    output: Output
    signer: str


class RemoteCache:
    def __init__(self, cache: Cache, repository: str, *, trusted: dict[str, bytes],
                 signing_key: SigningKey | None = None, tls_verify: bool = True) -> None:
        self.cache = cache
        self.repository = repository.removeprefix("docker://")
        self.trusted = trusted
        self.signing_key = signing_key
        self.tls_verify = tls_verify

    def ref(self, key: str) -> str:
        return f"docker://{self.repository}:{key}"

    # Push.

    def push(self, output: Output) -> str:
        """Sign and push ``output``; returns the pushed manifest digest."""
        if self.signing_key is None:
            raise HadronError("no cache signing key is configured: outputs are pushed signed",
                              hint="make one with `hadron cache keygen NAME`, then set [cache] signing_key in "
                              "hadron.toml or $HADRON_CACHE_SIGNING_KEY")
        with self.cache.layout.work_dir("cache-push") as work:
            files: dict[str, Path] = {}
            for o in OUTPUTS:
                files[f"{o}.tar"] = work / f"{o}.tar"
                with files[f"{o}.tar"].open("wb") as f:
                    tree = output.path / o
                    if tree.is_dir():
                        oci.write_layer_tar(tree, f, 0)
                    else:
                        tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT).close()
            files[MANIFEST] = output.path / MANIFEST
            files[LOG] = output.log
            signed = {n: file_sha256(p) for n, p in files.items()}
            sig = {"signer": self.signing_key.name, "signed": {"key": output.key, "files": signed},
                   "signature": self.signing_key.sign(_payload(output.key, signed))}
            files[SIGNATURE] = work / SIGNATURE
            files[SIGNATURE].write_text(json.dumps(sig, indent=1, sort_keys=True) + "\n")
            layout = work / "layout"
            digest = oci.write_artifact(files, layout, output.key, artifact_type=ARTIFACT_TYPE, file_media=FILE_MEDIA,
                                        annotations={"org.opencontainers.image.title": f"hadron output {output.key}"})
            runner.run(["skopeo", "copy", "--quiet", f"--dest-tls-verify={str(self.tls_verify).lower()}",
                        f"oci:{layout}:{output.key}", self.ref(output.key)], what=f"pushing output {output.key[:12]}")
        return digest

    # Pull.

    def pull(self, key: str) -> Pulled | None:
        """The output for ``key`` from the registry, verified and committed to the local cache; None
        when the registry has none. Raises :class:`Refused` for an artifact that may not be used."""
        hit = self.cache.get(key)
        if hit is not None:
            return Pulled(hit, "local")
        with self.cache.layout.work_dir("cache-pull") as work:
            layout = work / "layout"
            res = runner.run(["skopeo", "copy", "--quiet", f"--src-tls-verify={str(self.tls_verify).lower()}",
                              self.ref(key), f"oci:{layout}:{key}"], what=f"pulling output {key[:12]}", check=False)
            if res.returncode != 0:
                if any(m in res.stderr.lower() for m in MISSING):
                    return None
                raise HadronError(f"could not pull {self.ref(key)}: {res.stderr.strip()[-300:]}")
            try:
                files = oci.read_artifact(layout, self.ref(key), artifact_type=ARTIFACT_TYPE, file_media=FILE_MEDIA)
            except HadronError as e:
                raise Refused(e.message) from None
            signer = self._check_signature(key, files)
            with self.cache.lock(key):
                hit = self.cache.get(key)
                if hit is not None:  # built or pulled meanwhile by another hadron process
                    return Pulled(hit, "local")
                staged = self.cache.new_tmp(key)
                try:
                    self._unpack(key, files, staged)
                    out = self.cache.adopt(key, staged)
                finally:
                    remove_tree(staged)
            return Pulled(out, signer)

    def _check_signature(self, key: str, files: dict[str, Path]) -> str:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        where = self.ref(key)
        if SIGNATURE not in files:
            raise Refused(f"{where} is not signed (no {SIGNATURE})")
        try:
            sig = json.loads(files[SIGNATURE].read_text())
            signer, signed, signature = str(sig["signer"]), sig["signed"], base64.b64decode(sig["signature"])
            listed: dict[str, str] = dict(signed["files"])
        except (ValueError, KeyError, TypeError) as e:
            raise Refused(f"{where}: unreadable {SIGNATURE}: {e!r}") from None
        if signer not in self.trusted:
            raise Refused(f"{where} is signed by {signer!r}, which is not a trusted key",
                          hint="add its public key to [cache] trusted_keys in hadron.toml if you trust that builder")
        try:
            Ed25519PublicKey.from_public_bytes(self.trusted[signer]).verify(signature, _payload(str(signed["key"]),
                                                                                                 listed))
        except InvalidSignature:
            raise Refused(f"{where}: the signature by {signer!r} does not verify") from None
        if signed["key"] != key:
            raise Refused(f"{where} is signed for key {signed['key']}, not {key}")
        if set(listed) != set(FILES) or set(files) != {*FILES, SIGNATURE}:
            raise Refused(f"{where}: the artifact's files {sorted(files)} are not the signed ones {sorted(listed)}")
        for name in FILES:
            if file_sha256(files[name]) != listed[name]:
                raise Refused(f"{where}: {name} does not match its signed sha256")
        return signer

    def _unpack(self, key: str, files: dict[str, Path], staged: Path) -> None:
        where = self.ref(key)
        out = staged / "out"
        out.mkdir()
        manifest = json.loads(files[MANIFEST].read_text())
        if manifest.get("key") != key or manifest.get("digest") != content_digest(manifest.get("files", [])):
            raise Refused(f"{where}: its manifest is not for this key or does not match its own file list")
        for o in OUTPUTS:
            _extract(files[f"{o}.tar"], out / o, where)
        problems = diff_manifest(out, manifest["files"], scan_outputs(out))
        if problems:
            raise Refused(f"{where}: the unpacked output differs from its signed manifest: " + "; ".join(problems[:5]))
        (out / MANIFEST).write_bytes(files[MANIFEST].read_bytes())
        (out / LOG).write_bytes(files[LOG].read_bytes())


def _extract(tar_path: Path, dest: Path, where: str) -> None:
    """Unpack one output tree: only regular files, directories, symbolic and hard links, each
    inside ``dest``."""
    dest.mkdir()
    with tarfile.open(tar_path, mode="r:") as tf:
        members = tf.getmembers()
        links = {m.name for m in members if m.issym()}
        for m in members:
            if any("/".join(Path(m.name).parts[:i]) in links for i in range(1, len(Path(m.name).parts))):
                raise Refused(f"{where}: {tar_path.name} has an entry below a symbolic link: {m.name!r}")
            parts = Path(m.name).parts
            if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                raise Refused(f"{where}: {tar_path.name} holds an entry that may not be unpacked: {m.name!r}")
            if m.islnk() and (m.linkname.startswith("/") or ".." in Path(m.linkname).parts):
                raise Refused(f"{where}: {tar_path.name} holds a hard link out of the tree: {m.name!r}")
        if not members:
            dest.rmdir()
            return
        tf.extractall(dest, members=members, numeric_owner=True)  # every member checked above
