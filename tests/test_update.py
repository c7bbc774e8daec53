"""Update sets without a VM: version order, the dm-verity superblock, signing and verifying a set
(signature, checksums, unlisted and missing files, incomplete and older versions), the OCI artifact
layout, and a push and pull through a real registry."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from hadron.boot import secureboot
from hadron.errors import HadronError
from hadron.image import oci
from hadron.lifecycle import sysext_check, update

ID = "core-immutable"
U = "0123abcd-0000-4000-8000-00000000000{}"


@pytest.mark.parametrize(("a", "b"), [("2", "1"), ("10", "9"), ("1.10", "1.9"), ("1.1", "1.1~rc1"), ("1.0a", "1.0")])
def test_version_order(a: str, b: str) -> None:
    assert update.newer(a, b) and not update.newer(b, a)
    assert not update.newer(a, a)


def test_verity_superblock_gives_the_data_size(tmp_path: Path) -> None:
    sb = bytearray(512)
    sb[:8] = b"verity\0\0"
    sb[64:68] = (4096).to_bytes(4, "little")
    sb[72:80] = (10399).to_bytes(8, "little")
    (tmp_path / "h").write_bytes(bytes(sb) + bytes(8192))
    assert update.verity_data_bytes(tmp_path / "h") == 4096 * 10399
    (tmp_path / "x").write_bytes(bytes(512))
    with pytest.raises(HadronError, match="dm-verity superblock"):
        update.verity_data_bytes(tmp_path / "x")


def test_trim_drops_only_trailing_zero_blocks(tmp_path: Path) -> None:
    f = tmp_path / "p"
    f.write_bytes(b"a" * 5000 + bytes(3192) + bytes(4096 * 3))
    update._trim_zero_blocks(f)
    assert f.stat().st_size == 8192


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> secureboot.KeySet:
    d = tmp_path_factory.mktemp("keys") / "k"
    return secureboot.generate_keys(d)


def make_set(d: Path, keys: secureboot.KeySet, *versions: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for v in versions:
        (d / f"{ID}_{v}.efi").write_bytes(b"MZ uki " + v.encode())
        for i, kind in enumerate(("root", "verity", "verity-sig")):
            (d / f"{ID}_{v}_{U.format(i)}.{kind}.raw").write_bytes(f"{kind} {v}".encode())
    update.sign_sums(keys, d)
    return d


def test_a_signed_set_verifies_and_lists_its_versions(tmp_path: Path, keys: secureboot.KeySet) -> None:
    d = make_set(tmp_path / "set", keys, "2", "3")
    versions = update.verify(d, keys.db.crt, current="1")
    assert sorted(versions) == ["2", "3"] and len(versions["2"]) == 4
    assert (d / update.SUMS).read_text().count("\n") == 8


def test_tampering_is_refused_with_the_file_named(tmp_path: Path, keys: secureboot.KeySet) -> None:
    d = make_set(tmp_path / "set", keys, "2")
    root = next(d.glob("*.root.raw"))
    root.write_bytes(b"root 2 changed")
    with pytest.raises(HadronError, match=f"{root.name} does not match its checksum"):
        update.verify(d, keys.db.crt)
    make_set(d, keys)  # re-sign what is there now
    update.verify(d, keys.db.crt)
    sums = (d / update.SUMS).read_text()
    (d / update.SUMS).write_text(sums.replace(sums[:64], "0" * 64, 1))
    with pytest.raises(HadronError, match="is not a valid signature"):
        update.verify(d, keys.db.crt)


def test_other_signer_unlisted_missing_incomplete_and_old(tmp_path: Path, keys: secureboot.KeySet) -> None:
    other = secureboot.generate_keys(tmp_path / "other")
    d = make_set(tmp_path / "a", other, "2")
    with pytest.raises(HadronError, match="is not a valid signature"):
        update.verify(d, keys.db.crt)
    d = make_set(tmp_path / "b", keys, "2")
    (d / "extra.bin").write_bytes(b"x")
    with pytest.raises(HadronError, match=r"extra\.bin is not listed"):
        update.verify(d, keys.db.crt)
    (d / "extra.bin").unlink()
    next(d.glob("*.verity.raw")).unlink()
    with pytest.raises(HadronError, match=r"listed in .* but missing"):
        update.verify(d, keys.db.crt)
    make_set(d, keys)
    with pytest.raises(HadronError, match=r"version 2 .* is incomplete"):
        update.verify(d, keys.db.crt)
    d = make_set(tmp_path / "c", keys, "2")
    with pytest.raises(HadronError, match="not newer than the running version 2"):
        update.verify(d, keys.db.crt, current="2")
    with pytest.raises(HadronError, match="not newer than the running version 3"):
        update.verify(d, keys.db.crt, current="3")


def test_artifact_layout_names_every_file(tmp_path: Path, keys: secureboot.KeySet) -> None:
    d = make_set(tmp_path / "set", keys, "2")
    update.to_layout(d, tmp_path / "layout", "update")
    index = json.loads((tmp_path / "layout/index.json").read_text())
    digest = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((tmp_path / "layout/blobs/sha256" / digest).read_text())
    assert manifest["artifactType"] == update.ARTIFACT_TYPE
    titles = sorted(layer["annotations"][oci.TITLE] for layer in manifest["layers"])
    assert titles == sorted(p.name for p in d.iterdir())


def test_push_and_pull_through_a_registry(tmp_path: Path, keys: secureboot.KeySet, registry: str) -> None:
    if shutil.which("skopeo") is None:
        pytest.fail("skopeo is not installed")
    d = make_set(tmp_path / "set", keys, "2")
    ref = f"{registry}/hadron/update:2"
    update.push(d, keys.db.crt, ref, tls_verify=False)
    got = tmp_path / "pulled"
    assert sorted(update.pull(ref, got, keys.db.crt, current="1", tls_verify=False)) == ["2"]
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in d.iterdir())
    # an older set than the running version is refused and nothing is written
    with pytest.raises(HadronError, match="not newer"):
        update.pull(ref, tmp_path / "old", keys.db.crt, current="5", tls_verify=False)
    assert not (tmp_path / "old").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hadron-pull-")]
    # a set pushed with a broken signature is refused on pull
    bad = make_set(tmp_path / "bad", keys, "3")
    (bad / update.SUMS_SIG).write_bytes(sysext_check.MARKER)
    update.to_layout(bad, tmp_path / "badlayout", "update")
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{tmp_path / 'badlayout'}:update",
                    f"docker://{registry}/hadron/update:bad"], check=True)
    with pytest.raises(HadronError, match="is not a valid signature"):
        update.pull(f"{registry}/hadron/update:bad", tmp_path / "bad-pulled", keys.db.crt, tls_verify=False)
    assert not (tmp_path / "bad-pulled").exists()
