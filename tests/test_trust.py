"""SBOM, provenance and signatures of images: the SBOM validated by spdx-tools, the provenance's DSSE
signature by securesystemslib, `hadron verify` on good and altered images, and the manifest
signature of a pushed image checked by skopeo under a policy that requires it."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from spdx_tools.spdx.parser.parse_anything import parse_file
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from conftest import Project, add_image, add_static_hello
from hadron.engine.recipe import load_recipes
from hadron.errors import HadronError
from hadron.image import oci
from hadron.trust import keys, provenance, registry, sbom

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
              pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed")]


@pytest.fixture(scope="module")
def key_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, keys.ImageKeys]:
    base = tmp_path_factory.mktemp("k")
    return {name: keys.generate(base / name) for name in ("builder", "stranger")}


@pytest.fixture
def signed(project: Project, key_dirs: dict[str, keys.ImageKeys], monkeypatch: pytest.MonkeyPatch) -> Project:
    """An image of two packages, one linking a static library that is a build-only input, built
    with the builder's keys."""
    monkeypatch.setenv("HADRON_KEYS", str(key_dirs["builder"].directory))
    project.add("liba", "make", [])
    project.add("app", "make", ["liba"])
    add_static_hello(project)
    add_image(project, "mini", ["hello", "app"])
    return project


def _build(p: Project) -> Path:
    res = p.hadron("build", "mini", "--json", check=True)
    return Path(json.loads(res.stdout)["images"]["mini"]["path"])


def _artifacts(image: Path) -> dict[str, oci.Referrer]:
    desc, _ = oci.image_manifest(image / "oci", "0.1")
    return {a.artifact_type: a for a, _ in oci.referrers(image / "oci", str(desc["digest"]))}


def _validate(text: str, tmp: Path) -> list[object]:
    path = tmp / "sbom.spdx.json"
    path.write_text(text)
    return list(validate_full_spdx_document(parse_file(str(path)), "SPDX-2.3"))


def test_sbom_is_valid_spdx_with_components_sources_and_every_file(signed: Project, tmp_path: Path) -> None:
    image = _build(signed)
    path = image / "sbom.spdx.json"
    # spdx-tools takes a download location for a URL only with a DNS name ending in a top-level domain;
    # the test's source server is a loopback address, so its host is named as one for the validation.
    text = path.read_text().replace(signed.url, "http://sources.example.org")
    assert signed.url in path.read_text() and _validate(text, tmp_path) == []
    data = json.loads(path.read_bytes())
    assert _artifacts(image)[sbom.SPDX_MEDIA].data == path.read_bytes()
    pkgs = {p["name"]: p for p in data["packages"]}
    hello = pkgs["hello"]
    assert hello["versionInfo"] == "1" and hello["licenseDeclared"] == "MIT"
    assert hello["downloadLocation"] == f"{signed.url}/hello-1.tar.gz"
    assert hello["checksums"] == [{"algorithm": "SHA256", "checksumValue": _source_sha(signed, "hello")}]
    assert hello["externalRefs"][0]["referenceLocator"].startswith("pkg:generic/hello@1?download_url=")
    manifest = json.loads((image / "image.json").read_text())["oci"]["manifest"]
    assert pkgs["hadron-mini"]["checksums"][0]["checksumValue"] == manifest.removeprefix("sha256:")
    ids = {p["SPDXID"]: p["name"] for p in data["packages"]}
    rels = {(ids.get(r["spdxElementId"], r["spdxElementId"]), r["relationshipType"],
             ids.get(r["relatedSpdxElement"], r["relatedSpdxElement"])) for r in data["relationships"]}
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", "hadron-mini") in rels
    assert ("hadron-mini", "CONTAINS", "app") in rels and ("hadron-mini", "CONTAINS", "hello") in rels
    assert ("hello", "GENERATED_FROM", "hello-source-0") in rels
    assert ("liba", "BUILD_DEPENDENCY_OF", "app") in rels
    assert "liba" not in {r[2] for r in rels if r[0] == "hadron-mini"}
    # Every regular file of the image, with the package that installed it.
    files = {f["fileName"]: f["SPDXID"] for f in data["files"]}
    rootfs = image / "rootfs"
    on_disk = {f"./{p.relative_to(rootfs).as_posix()}" for p in rootfs.rglob("*") if p.is_file() and not p.is_symlink()}
    assert set(files) == on_disk
    assert ("hello", "CONTAINS", files["./usr/bin/hello"]) in rels
    assert ("hadron-mini", "CONTAINS", files["./usr/lib/os-release"]) in rels


def test_sbom_of_the_distro_packages_validates(tmp_path: Path) -> None:
    """Every recipe of the distro as a component (their real URLs and licence expressions)."""
    recipes = load_recipes([ROOT / "distro" / "packages"])
    comps = [sbom.Component(name=n, version=r.version, license=r.license, homepage=r.homepage, output="0" * 64,
                            sources=tuple(sbom.Source(s.url, s.sha256) for s in r.sources if s.sha256))
             for n, r in sorted((n, lr.recipe) for n, lr in recipes.items())]
    files = [sbom.FileEntry("usr/bin/x", "1" * 40, "2" * 64)]
    doc = sbom.document(image="core", version="0.1", manifest_digest="sha256:" + "3" * 64, epoch=1735689600,
                        files=files, owners={"usr/bin/x": comps[0].name}, components=comps[1:], build_inputs=[])
    assert _validate(json.dumps(doc), tmp_path) == []
    assert len(doc["packages"]) > len(comps)


def _source_sha(p: Project, name: str) -> str:
    return str(tomllib.loads((p.packages / f"{name}.toml").read_text())["sources"][0]["sha256"])


def test_provenance_is_a_signed_statement_about_the_image(signed: Project, key_dirs: dict[str, keys.ImageKeys]
                                                           ) -> None:
    image = _build(signed)
    envelope = (image / "provenance.dsse.json").read_bytes()
    assert _artifacts(image)[provenance.DSSE_MEDIA].data == envelope
    good = keys.public_key(key_dirs["builder"].provenance_pub)
    stmt, verified = provenance.open_envelope(envelope, "test", good)
    assert verified
    assert stmt["_type"] == "https://in-toto.io/Statement/v1"
    assert stmt["predicateType"] == "https://slsa.dev/provenance/v1"
    manifest = json.loads((image / "image.json").read_text())["oci"]["manifest"]
    assert stmt["subject"][0]["digest"] == {"sha256": manifest.removeprefix("sha256:")}
    deps = stmt["predicate"]["buildDefinition"]["resolvedDependencies"]
    digests = {d["name"]: d.get("digest", {}).get("sha256") for d in deps}
    for name in ("hello", "app", "liba"):
        assert digests[f"source:{name}:{_source_sha_file(signed, name)}"] == _source_sha(signed, name)
        assert len(digests[f"output:{name}"] or "") == 64
    assert "build-environment" in digests
    run = stmt["predicate"]["runDetails"]
    assert run["metadata"]["invocationId"] == image.name and run["builder"]["id"]
    sbom_sha = [b["digest"]["sha256"] for b in run["byproducts"] if b["name"] == "sbom.spdx.json"]
    assert sbom_sha == [hashlib.sha256((image / "sbom.spdx.json").read_bytes()).hexdigest()]
    # Tampered payload, tampered signature, another key: refused.
    env = json.loads(envelope)
    payload = json.loads(base64.b64decode(env["payload"]))
    payload["subject"][0]["digest"]["sha256"] = "0" * 64
    bad_payload = dict(env, payload=base64.b64encode(json.dumps(payload).encode()).decode())
    sig = base64.b64decode(env["signatures"][0]["sig"])
    bad_sig = dict(env, signatures=[dict(env["signatures"][0],
                                         sig=base64.b64encode(sig[:-1] + bytes([sig[-1] ^ 1])).decode())])
    for bad in (bad_payload, bad_sig):
        with pytest.raises(HadronError, match="does not verify"):
            provenance.open_envelope(json.dumps(bad).encode(), "test", good)
    with pytest.raises(HadronError, match="does not verify"):
        provenance.open_envelope(envelope, "test", keys.public_key(key_dirs["stranger"].provenance_pub))
    unsigned = dict(env, signatures=[])
    with pytest.raises(HadronError, match="not signed"):
        provenance.open_envelope(json.dumps(unsigned).encode(), "test", good)


def _source_sha_file(p: Project, name: str) -> str:
    return str(tomllib.loads((p.packages / f"{name}.toml").read_text())["sources"][0]["url"]).rsplit("/", 1)[-1]


def _verify(p: Project, target: str | Path, keys_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return p.hadron("verify", str(target), "--keys", str(keys_dir), *extra)


def _rewrite(image: Path, dest: Path, change: str, key_dirs: dict[str, keys.ImageKeys]) -> Path:
    """A copy of the image's layout whose image (tag 0.1) has a changed /usr/bin/hello, and whose
    referrers are: ``"old"`` the original SBOM and provenance; ``"resigned"`` the original SBOM with a
    provenance about the new manifest, naming that SBOM, signed by the builder's key."""
    rootfs = dest / "rootfs"
    shutil.copytree(image / "rootfs", rootfs, symlinks=True)
    target = rootfs / "usr/bin/hello"
    target.chmod(0o755)
    target.write_bytes(target.read_bytes() + b"\0altered")
    layout = dest / "oci"
    oci.write_layout(rootfs, layout, tag="0.1", epoch=1735689600)
    desc, _ = oci.image_manifest(layout, "0.1")
    arts = _artifacts(image)
    prov = arts[provenance.DSSE_MEDIA]
    if change == "resigned":
        stmt, _ = provenance.open_envelope(prov.data, "test", None)
        stmt["subject"][0]["digest"]["sha256"] = str(desc["digest"]).removeprefix("sha256:")
        prov = oci.Referrer(prov.artifact_type, prov.media_type,
                            provenance.sign(stmt, key_dirs["builder"].signer()), prov.annotations)
    oci.add_referrers(layout, desc, [arts[sbom.SPDX_MEDIA], prov])
    return layout


def test_verify_accepts_the_built_image_and_refuses_altered_foreign_or_unsigned(
        signed: Project, key_dirs: dict[str, keys.ImageKeys], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = _build(signed)
    builder, stranger = key_dirs["builder"].directory, key_dirs["stranger"].directory
    ok = _verify(signed, "mini", builder, "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["sbom_files"] == 4 and report["sbom_packages"] >= 5
    assert _verify(signed, image, builder).returncode == 0
    res = _verify(signed, "mini", stranger)
    assert res.returncode == 1 and "does not verify" in res.stderr
    # A file changed, the provenance signed again for the new manifest: the SBOM no longer matches.
    res = _verify(signed, _rewrite(image, tmp_path / "resigned", "resigned", key_dirs), builder)
    assert res.returncode == 1 and "/usr/bin/hello: content differs from the SBOM's" in res.stderr, res.stderr
    # The original provenance attached to another manifest: it is about another image.
    res = _verify(signed, _rewrite(image, tmp_path / "old", "old", key_dirs), builder)
    assert res.returncode == 1 and "not this image" in res.stderr, res.stderr
    # The layer changed in place: its digest no longer matches.
    copy = tmp_path / "inplace"
    shutil.copytree(image / "oci", copy)
    _, manifest = oci.image_manifest(copy, "0.1")
    layer = copy / "blobs/sha256" / str(manifest["layers"][0]["digest"]).removeprefix("sha256:")
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0xFF
    layer.write_bytes(bytes(data))
    res = _verify(signed, copy, builder)
    assert res.returncode == 1 and "does not match its digest" in res.stderr, res.stderr
    # Built without a provenance key: reported unsigned, never verified.
    monkeypatch.delenv("HADRON_KEYS")
    unsigned = _build(signed)
    assert unsigned != image
    res = _verify(signed, unsigned, builder)
    assert res.returncode == 1 and "the provenance is not signed" in res.stderr, res.stderr


def _skopeo_pull(ref: str, policy: Path, lookaside: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    regd = tmp / "registries.d"
    regd.mkdir(exist_ok=True)
    (regd / "default.yaml").write_text(f"default-docker:\n  lookaside: file://{lookaside}\n")
    dest = tmp / "pulled"
    shutil.rmtree(dest, ignore_errors=True)
    return subprocess.run(["skopeo", "--policy", str(policy), "--registries.d", str(regd), "copy", "--quiet",
                           "--remove-signatures", "--src-tls-verify=false", f"docker://{ref}", f"oci:{dest}:x"],
                          capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_pushed_image_signature_is_checked_by_skopeo_policy(signed: Project, key_dirs: dict[str, keys.ImageKeys],
                                                            registry: str, tmp_path: Path) -> None:
    builder = key_dirs["builder"]
    ref = f"{registry}/hadron/mini:0.1"
    lookaside = tmp_path / "signatures"
    res = signed.hadron("push", ref, "--image", "mini", "--no-tls-verify", "--signatures", str(lookaside), "--json",
                        check=True)
    pushed = json.loads(res.stdout)
    assert pushed["signed_by"] == builder.fingerprint
    ok = _verify(signed, ref, builder.directory, "--no-tls-verify", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["manifest"] == pushed["manifest"]
    # A standard client: skopeo with a policy that requires the builder's signature.
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {
        "docker": {registry: [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(builder.keyring)}]}}}))
    assert _skopeo_pull(ref, policy, lookaside, tmp_path).returncode == 0
    # The signature file altered: refused.
    sig = next(lookaside.rglob("signature-1"))
    good_sig = sig.read_bytes()
    sig.write_bytes(good_sig[:-8] + bytes(8))
    res = _skopeo_pull(ref, policy, lookaside, tmp_path)
    assert res.returncode != 0 and "rejected" in res.stderr, res.stderr
    sig.write_bytes(good_sig)
    # Another key's policy: refused, by skopeo and by hadron verify.
    other = json.loads(policy.read_text())
    other["transports"]["docker"][registry][0]["keyPath"] = str(key_dirs["stranger"].keyring)
    policy.write_text(json.dumps(other))
    assert _skopeo_pull(ref, policy, lookaside, tmp_path).returncode != 0
    res = signed.hadron("verify", ref, "--keys", str(builder.directory), "--keyring",
                        str(key_dirs["stranger"].keyring), "--no-tls-verify")
    assert res.returncode == 1 and "skopeo refused the image" in res.stderr, res.stderr
    # Pushed unsigned: skopeo's policy refuses it, hadron verify reports it unsigned.
    unsigned_ref = f"{registry}/hadron/unsigned:0.1"
    signed.hadron("push", unsigned_ref, "--image", "mini", "--no-tls-verify", "--unsigned", check=True)
    policy.write_text(json.dumps({"default": [{"type": "reject"}], "transports": {
        "docker": {registry: [{"type": "signedBy", "keyType": "GPGKeys", "keyPath": str(builder.keyring)}]}}}))
    res = _skopeo_pull(unsigned_ref, policy, lookaside, tmp_path)
    assert res.returncode != 0 and "no signature exists" in res.stderr, res.stderr
    res = _verify(signed, unsigned_ref, builder.directory, "--no-tls-verify")
    assert res.returncode == 1 and "the image manifest is not signed" in res.stderr, res.stderr
    # The tag moved to another manifest (the signature and referrers are for the old one): refused.
    other_root = tmp_path / "other-root"
    (other_root / "etc").mkdir(parents=True)
    (other_root / "etc/motd").write_text("not hadron\n")
    oci.write_layout(other_root, tmp_path / "other", tag="x", epoch=1735689600)
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{tmp_path / 'other'}:x",
                    f"docker://{ref}"], check=True, capture_output=True)
    assert _skopeo_pull(ref, policy, lookaside, tmp_path).returncode != 0
    res = _verify(signed, ref, builder.directory, "--no-tls-verify")
    assert res.returncode == 1 and "no SBOM, provenance or signature refers to image" in res.stderr, res.stderr


def test_push_without_an_image_key_says_how_to_get_one(mini: Project, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HADRON_KEYS", str(tmp_path / "nokeys"))
    res = mini.hadron("push", "127.0.0.1:9/hadron/mini:0.1", "--image", "mini")
    assert res.returncode == 1 and "no image signing key" in res.stderr and "hadron keys image-signing" in res.stderr


def test_registry_references_are_parsed_or_refused() -> None:
    r = registry.parse_ref("docker://127.0.0.1:5000/hadron/core:0.1")
    assert (r.repository, r.tag, r.path) == ("127.0.0.1:5000/hadron/core", "0.1", "hadron/core")
    for bad in ("core", "127.0.0.1:5000/hadron/core", "host/x@sha256:00"):
        with pytest.raises(HadronError, match="not a registry reference"):
            registry.parse_ref(bad)


def test_key_generation_refuses_to_replace_keys(key_dirs: dict[str, keys.ImageKeys]) -> None:
    ks = key_dirs["builder"]
    assert ks.provenance_key.stat().st_mode & 0o777 == 0o600
    assert len(ks.fingerprint) == 40 and ks.keyring.stat().st_size > 0
    with pytest.raises(HadronError, match="already holds image signing keys"):
        keys.generate(ks.directory)


def test_a_provenance_key_added_later_signs_the_next_build(mini: Project, key_dirs: dict[str, keys.ImageKeys],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HADRON_KEYS", raising=False)
    unsigned = _build(mini)
    assert json.loads((unsigned / "image.json").read_text())["trust"]["provenance_signed_by"] is None
    project_keys = mini.root / "keys"
    project_keys.mkdir()
    for f in (keys.PROVENANCE_KEY, keys.PROVENANCE_PUB):
        shutil.copy2(key_dirs["builder"].directory / f, project_keys / f)
    signed = _build(mini)  # not answered by the no-op memo: the key is one of the build's inputs
    assert signed != unsigned
    assert _verify(mini, "mini", project_keys).returncode == 0
