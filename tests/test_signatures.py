"""Upstream signatures: fetch admits a signed source only when its signature verifies with a pinned key.

Keys are made here with gpg (ed25519); files are served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hadron.engine.fetch import SourceStore, fetch_source
from hadron.engine.mirrors import DebianProvider
from hadron.engine.recipe import LoadedRecipe, MirrorAlternative, Recipe, Signature, Source
from hadron.errors import FetchError
from hadron.layout import CacheLayout
from synth import http_server


@dataclass(frozen=True)
class Key:
    fingerprint: str
    home: Path

    def sign(self, data: Path, out: Path, *extra: str) -> Path:
        subprocess.run(["gpg", "--homedir", self.home, "--batch", "--yes", "--pinentry-mode", "loopback",
                        "--passphrase", "", "--local-user", self.fingerprint, *extra, "--armor", "--output", out,
                        "--detach-sign", data], check=True, capture_output=True)
        return out


def make_key(home: Path, name: str, keys_dir: Path, expire: str = "never") -> Key:
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback", "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", f"{name} <{name.lower()}@example.org>", "ed25519", "sign", expire],
                   check=True, capture_output=True)
    cols = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True, capture_output=True,
                          text=True).stdout
    fpr = next(line.split(":")[9] for line in cols.splitlines() if line.startswith("fpr:"))
    keys_dir.mkdir(parents=True, exist_ok=True)
    exported = subprocess.run([*gpg, "--armor", "--export", fpr], check=True, capture_output=True).stdout
    (keys_dir / f"{fpr}.asc").write_bytes(exported)
    return Key(fpr, home)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Key, Key]:
    root = tmp_path_factory.mktemp("keys")
    keys_dir = root / "keys"
    return keys_dir, make_key(root / "a", "Alice", keys_dir), make_key(root / "b", "Bob", root / "other-keys")


@pytest.fixture()
def www(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    d = tmp_path / "www"
    d.mkdir()
    with http_server(d) as (url, hits):
        yield d, url, hits


def store_of(tmp_path: Path) -> SourceStore:
    return SourceStore(CacheLayout(tmp_path / "cache"))


def stored(store: SourceStore) -> list[str]:
    objs = sorted(p.name for p in store.objects.iterdir()) if store.objects.exists() else []
    tmp = sorted(p.name for p in store.tmp.iterdir()) if store.tmp.exists() else []
    return objs + tmp


def publish(www: Path, name: str, data: bytes) -> tuple[Path, str]:
    (www / name).write_bytes(data)
    return www / name, hashlib.sha256(data).hexdigest()


def signed_source(url: str, name: str, digest: str, key: str, **kw: object) -> Source:
    return Source(url=f"{url}/{name}", sha256=digest,
                  signature=Signature(url=f"{url}/{name}.asc", keys=[key], **kw))  # type: ignore[arg-type]


def test_good_signature_is_verified_recorded_and_not_fetched_again(tmp_path: Path, keys: tuple[Path, Key, Key],
                                                                   www: tuple[Path, str, list[str]]) -> None:
    keys_dir, alice, _ = keys
    d, url, hits = www
    f, digest = publish(d, "x-1.tar.gz", b"release")
    alice.sign(f, d / "x-1.tar.gz.asc")
    store = store_of(tmp_path)
    src = signed_source(url, "x-1.tar.gz", digest, alice.fingerprint)
    got = fetch_source(store, src, [], keys_dir=keys_dir)
    assert got.trust == f"signed by {alice.fingerprint} (sqv)"
    record = store.signature(digest)
    assert record is not None and record["signer"] == alice.fingerprint and record["url"].endswith(".asc")
    again = fetch_source(store, src, [], keys_dir=keys_dir, offline=True)
    assert again.origin == "store" and again.trust == got.trust
    assert hits == ["/x-1.tar.gz", "/x-1.tar.gz.asc"]


def test_wrong_signature_is_refused_and_nothing_is_stored(tmp_path: Path, keys: tuple[Path, Key, Key],
                                                          www: tuple[Path, str, list[str]]) -> None:
    keys_dir, alice, _ = keys
    d, url, _ = www
    _, digest = publish(d, "x-1.tar.gz", b"release")
    other, _ = publish(d, "other", b"something else")
    alice.sign(other, d / "x-1.tar.gz.asc")
    store = store_of(tmp_path)
    with pytest.raises(FetchError, match="does not verify with the pinned key") as ei:
        fetch_source(store, signed_source(url, "x-1.tar.gz", digest, alice.fingerprint), [], keys_dir=keys_dir,
                     where="x.toml: sources[0]")
    assert "x.toml: sources[0]" in str(ei.value)
    assert stored(store) == [] and store.signature(digest) is None


def test_signature_by_another_key_is_refused(tmp_path: Path, keys: tuple[Path, Key, Key],
                                             www: tuple[Path, str, list[str]]) -> None:
    keys_dir, alice, bob = keys
    d, url, _ = www
    f, digest = publish(d, "x-1.tar.gz", b"release")
    bob.sign(f, d / "x-1.tar.gz.asc")
    store = store_of(tmp_path)
    with pytest.raises(FetchError, match="does not verify"):
        fetch_source(store, signed_source(url, "x-1.tar.gz", digest, alice.fingerprint), [], keys_dir=keys_dir)
    assert stored(store) == []
    # Pinning Bob without his key file in the repository is an error that names the missing file.
    with pytest.raises(FetchError, match=f"key file\\(s\\) missing: .*{bob.fingerprint}.asc"):
        fetch_source(store, signed_source(url, "x-1.tar.gz", digest, bob.fingerprint), [], keys_dir=keys_dir)


def test_stripped_signature_means_no_file(tmp_path: Path, keys: tuple[Path, Key, Key],
                                          www: tuple[Path, str, list[str]]) -> None:
    keys_dir, alice, _ = keys
    d, url, _ = www
    _, digest = publish(d, "x-1.tar.gz", b"release")  # no .asc published
    store = store_of(tmp_path)
    with pytest.raises(FetchError, match=r"no copy of upstream's signature of x-1\.tar\.gz verifies"):
        fetch_source(store, signed_source(url, "x-1.tar.gz", digest, alice.fingerprint), [], keys_dir=keys_dir)
    assert stored(store) == []


def test_signature_from_a_debian_mirror_and_over_the_uncompressed_tar(
        tmp_path: Path, keys: tuple[Path, Key, Key], www: tuple[Path, str, list[str]]) -> None:
    """kernel.org signs the tar inside the .xz; Debian keeps that signature as <orig>.asc."""
    keys_dir, alice, _ = keys
    d, url, hits = www
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("k-1/README")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    tar = buf.getvalue()
    (d / "k-1.tar").write_bytes(tar)
    pool = d / "debian" / "pool" / "main" / "k" / "k"
    pool.mkdir(parents=True)
    xz = lzma.compress(tar)
    (pool / "k_1.orig.tar.xz").write_bytes(xz)
    alice.sign(d / "k-1.tar", pool / "k_1.orig.tar.xz.asc")
    digest = hashlib.sha256(xz).hexdigest()
    mirror = DebianProvider([f"{url}/debian"])

    def source(over: str) -> Source:
        return Source(url=f"{url}/k-1.tar.xz", sha256=digest,  # not on "upstream": only Debian has it
                      signature=Signature(url=f"{url}/k-1.tar.sign", keys=[alice.fingerprint], over=over),  # type: ignore[arg-type]
                      alternatives=[MirrorAlternative(provider="debian", package="k", file="k_1.orig.tar.xz")])

    with pytest.raises(FetchError, match="does not verify"):
        fetch_source(store_of(tmp_path / "1"), source("file"), [mirror], keys_dir=keys_dir)
    got = fetch_source(store_of(tmp_path / "2"), source("uncompressed"), [mirror], keys_dir=keys_dir)
    assert got.trust == f"signed by {alice.fingerprint} (sqv)"
    assert "/debian/pool/main/k/k/k_1.orig.tar.xz.asc" in hits


def test_legacy_policy_uses_gpgv_and_still_refuses_expired_keys(tmp_path: Path, keys: tuple[Path, Key, Key],
                                                                 www: tuple[Path, str, list[str]]) -> None:
    keys_dir, alice, _ = keys
    d, url, _ = www
    f, digest = publish(d, "x-1.tar.gz", b"release")
    alice.sign(f, d / "x-1.tar.gz.asc", "--digest-algo", "SHA1")
    src = signed_source(url, "x-1.tar.gz", digest, alice.fingerprint)
    with pytest.raises(FetchError, match="does not verify"):  # Sequoia's policy rejects SHA-1 signatures
        fetch_source(store_of(tmp_path / "1"), src, [], keys_dir=keys_dir)
    legacy = signed_source(url, "x-1.tar.gz", digest, alice.fingerprint,
                           legacy="a test key that signs with SHA-1")
    got = fetch_source(store_of(tmp_path / "2"), legacy, [], keys_dir=keys_dir)
    assert got.trust == f"signed by {alice.fingerprint} (gpgv)"

    carol = make_key(tmp_path / "c", "Carol", keys_dir, expire="seconds=1")
    carol.sign(f, d / "x-1.tar.gz.asc")
    time.sleep(2)
    with pytest.raises(FetchError, match="the signing key has expired"):
        fetch_source(store_of(tmp_path / "3"),
                     signed_source(url, "x-1.tar.gz", digest, carol.fingerprint, legacy="a test of expiry"),
                     [], keys_dir=keys_dir)


def test_a_file_stored_before_its_signature_was_checked_is_checked(tmp_path: Path, keys: tuple[Path, Key, Key],
                                                                   www: tuple[Path, str, list[str]]) -> None:
    keys_dir, alice, _ = keys
    d, url, _ = www
    f, digest = publish(d, "x-1.tar.gz", b"release")
    store = store_of(tmp_path)
    store.add_file(f, digest)
    src = signed_source(url, "x-1.tar.gz", digest, alice.fingerprint)
    with pytest.raises(FetchError, match="--offline forbids downloading it"):
        fetch_source(store, src, [], keys_dir=keys_dir, offline=True)
    with pytest.raises(FetchError, match="no copy of upstream's signature"):
        fetch_source(store, src, [], keys_dir=keys_dir)
    alice.sign(f, d / "x-1.tar.gz.asc")
    assert fetch_source(store, src, [], keys_dir=keys_dir).trust.startswith("signed by")
    assert store.signature(digest) is not None


def test_repack_and_unsigned_sources_say_why_they_are_trusted(tmp_path: Path, www: tuple[Path, str, list[str]]) -> None:
    d, url, _ = www
    _, digest = publish(d, "u-1.tar.gz", b"plain")
    store = store_of(tmp_path)
    got = fetch_source(store, Source(url=f"{url}/u-1.tar.gz", sha256=digest, unsigned="upstream does not sign"), [])
    assert got.trust == "sha256 pin, unsigned: upstream does not sign"


def recipe(**source: object) -> dict[str, object]:
    return {"name": "x", "version": "1", "summary": "s", "license": "MIT", "homepage": "https://example.org",
            "sources": [{"url": "https://example.org/x-1.tar.gz", "sha256": "a" * 64, **source}],
            "build": {"system": "make"}}


def test_a_source_names_its_signature_or_says_why_not() -> None:
    with pytest.raises(ValueError, match="give either `signature`"):
        Recipe.model_validate(recipe())
    with pytest.raises(ValueError, match="give either `signature`"):
        Recipe.model_validate(recipe(unsigned="upstream does not sign",
                                     signature={"url": "https://example.org/x.asc", "keys": ["A" * 40]}))
    with pytest.raises(ValueError, match="keys"):
        Recipe.model_validate(recipe(signature={"url": "https://example.org/x.asc", "keys": ["not-a-fingerprint"]}))
    Recipe.model_validate(recipe(signature={"url": "https://example.org/x.asc", "keys": ["A" * 40]}))


def test_authentication_fields_do_not_change_the_build_key(tmp_path: Path) -> None:
    signed = Recipe.model_validate(recipe(signature={"url": "https://example.org/x.asc", "keys": ["A" * 40]}))
    unsigned = Recipe.model_validate(recipe(unsigned="upstream does not sign"))
    other = Recipe.model_validate({**recipe(unsigned="upstream does not sign"), "version": "2"})
    d = [LoadedRecipe(recipe=r, path=tmp_path / "x.toml", folder=None).digest() for r in (signed, unsigned, other)]
    assert d[0] == d[1] != d[2]
