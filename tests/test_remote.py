"""The binary cache in an OCI registry: outputs signed by the builder, pulled instead of built by a
machine that trusts the builder's key, refused (and built locally) when tampered, unsigned, signed
by an untrusted key, or cut short by a registry killed in the middle of a push."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Project
from hadron.engine import remote
from hadron.errors import HadronError
from hadron.image import oci
from services import Registry

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")


def _config(p: Project, reg: str, *, secret: Path | None = None, trusted: list[str] | None = None,
            push: bool = True) -> None:
    lines = ["[cache]", f'remote = "{reg}/hadron/cache"', "tls_verify = false", f"push = {str(push).lower()}"]
    if secret is not None:
        lines.append(f'signing_key = "{secret}"')
    lines.append("trusted_keys = [" + ", ".join(f'"{k}"' for k in trusted or []) + "]")
    (p.root / "hadron.toml").write_text("\n".join(lines) + "\n")


def _build(p: Project, *, check: bool = True) -> dict[str, dict[str, object]]:
    res = p.hadron("build", "--json", check=check)
    out: dict[str, dict[str, object]] = json.loads(res.stdout)["packages"]
    return out


def _digest(info: dict[str, object]) -> str:
    return (Path(str(info["output"])) / "digest").read_text()


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    out = {}
    for name in ("builder-a", "stranger"):
        secret, public = remote.generate_key(name, tmp_path / "keys")
        out[name] = (secret, public.read_text().strip())
    return out


def test_key_files_and_signatures(tmp_path: Path) -> None:
    secret, public = remote.generate_key("b1", tmp_path)
    assert secret.stat().st_mode & 0o777 == 0o600
    key = remote.load_signing_key(secret)
    assert public.read_text().strip() == key.public()
    with pytest.raises(HadronError):
        remote.generate_key("b1", tmp_path)  # never overwritten
    with pytest.raises(HadronError, match="NAME:BASE64"):
        remote.parse_trusted(["b1:notbase64!"])
    assert set(remote.parse_trusted([key.public()])) == {"b1"}


def test_second_machine_pulls_everything_and_builds_nothing(project: Project, registry: str,
                                                            keys: dict[str, tuple[Path, str]],
                                                            tmp_path: Path) -> None:
    project.add("liba", "make")
    project.add("libb", "autotools", ["liba"])
    project.add("appc", "meson", ["libb", "liba"])
    secret, public = keys["builder-a"]
    _config(project, registry, secret=secret)
    a = _build(project)
    assert {p["status"] for p in a.values()} == {"built"}
    assert {p["remote"] for p in a.values()} == {"pushed"}

    # Machine B: an empty cache that trusts builder-a, no signing key, sources unreachable.
    b = dataclasses.replace(project, cache=tmp_path / "cache-b")
    _config(b, registry, trusted=[public])
    hits = len(project.hits)
    got = _build(b)
    assert {p["status"] for p in got.values()} == {"pulled"}
    assert {p["remote"] for p in got.values()} == {"signed by builder-a"}
    assert len(project.hits) == hits  # no source was fetched: nothing was compiled
    for name in a:
        assert got[name]["key"] == a[name]["key"] and _digest(got[name]) == _digest(a[name])
        ra, rb = Path(str(a[name]["output"])), Path(str(got[name]["output"]))
        for f in json.loads((ra / "manifest.json").read_text())["files"]:
            if f["type"] == "file":
                assert (rb / f["output"] / f["path"]).read_bytes() == (ra / f["output"] / f["path"]).read_bytes()
    # What was pulled passes the cache's own verification.
    res = b.hadron("cache", "verify", "--json", check=True)
    assert json.loads(res.stdout)["problems"] == []


def _tamper(registry: str, key: str, tmp_path: Path, change: str) -> None:
    """Re-push the artifact for ``key`` with one change: a flipped byte in runtime.tar (``data``),
    the signed list rewritten to match it (``resign``), or the signature left out (``unsigned``)."""
    ref = f"docker://{registry}/hadron/cache:{key}"
    layout = tmp_path / f"t-{change}"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", ref, f"oci:{layout}:{key}"], check=True)
    files = oci.read_artifact(layout, ref, artifact_type=remote.ARTIFACT_TYPE, file_media=remote.FILE_MEDIA)
    work = tmp_path / f"w-{change}"
    work.mkdir()
    copies = {n: work / n for n in files}
    for n, blob in files.items():
        shutil.copyfile(blob, copies[n])
    data = bytearray(copies["runtime.tar"].read_bytes())
    pos = data.index(b"synthetic") if b"synthetic" in data else len(data) // 2
    data[pos] ^= 0x20
    copies["runtime.tar"].write_bytes(bytes(data))
    if change == "resign":
        sig = json.loads(copies["signature.json"].read_text())
        sig["signed"]["files"]["runtime.tar"] = remote.file_sha256(copies["runtime.tar"])
        copies["signature.json"].write_text(json.dumps(sig))
    if change == "unsigned":
        del copies["signature.json"]
    out = tmp_path / f"o-{change}"
    oci.write_artifact(copies, out, key, artifact_type=remote.ARTIFACT_TYPE, file_media=remote.FILE_MEDIA)
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{out}:{key}", ref], check=True)


@pytest.mark.parametrize(("change", "reason"), [
    ("data", "runtime.tar does not match its signed sha256"),
    ("resign", "does not verify"),
    ("unsigned", "is not signed"),
    ("stranger", "is signed by 'stranger', which is not a trusted key"),
])
def test_untrustworthy_artifacts_are_refused_and_built_locally(project: Project, registry: str,
                                                               keys: dict[str, tuple[Path, str]], tmp_path: Path,
                                                               change: str, reason: str) -> None:
    project.add("liba", "make")
    signer = "stranger" if change == "stranger" else "builder-a"
    _config(project, registry, secret=keys[signer][0])
    a = _build(project)
    if change != "stranger":
        _tamper(registry, str(a["liba"]["key"]), tmp_path, change)
    b = dataclasses.replace(project, cache=tmp_path / "cache-b")
    _config(b, registry, trusted=[keys["builder-a"][1]], push=False)
    res = b.hadron("build", check=True)  # the progress lines say why, then that it was built here
    assert "liba: remote artifact refused: " in res.stderr and reason in res.stderr
    assert "liba: built in" in res.stderr
    got = json.loads(b.hadron("build", "--json", check=True).stdout)["packages"]["liba"]
    assert _digest(got) == _digest(a["liba"])  # built here, to the same content


def test_registry_killed_mid_push_leaves_nothing_a_pull_accepts(project: Project, tmp_path: Path,
                                                                keys: dict[str, tuple[Path, str]]) -> None:
    # A package whose output is large enough that its push takes a while.
    from synth import make_tarball

    digest = make_tarball(project.dist / "big-1.tar.gz", "big-1", {"README": "big\n"})
    (project.packages / "big.toml").write_text(
        'name = "big"\nversion = "1"\nsummary = "a large output"\nlicense = "MIT"\nhomepage = "https://example.org"\n'
        f'[[sources]]\nurl = "{project.url}/big-1.tar.gz"\nsha256 = "{digest}"\n'
        'unsigned = "a test file: no upstream signature"\n'
        '[build]\nsystem = "custom"\nbuild = "true"\n'
        "install = 'mkdir -p \"$DESTDIR/usr/share/big\" && "
        "head -c 400000000 /dev/urandom > \"$DESTDIR/usr/share/big/blob\"'\n"
        "[depends]\ntoolchain = false\n")
    reg = Registry(tmp_path / "reg")
    reg.start()
    try:
        _config(project, reg.address, secret=keys["builder-a"][0], push=False)
        built = _build(project)["big"]
        push = project.popen("cache", "push", "big")
        uploads = reg.root / "storage"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill once the blob upload has started, before it ends
            partial = [p for p in uploads.rglob("data") if "_uploads" in p.parts and p.stat().st_size > 1 << 20]
            if partial:
                break
            time.sleep(0.05)
        assert partial, "the push never started an upload"
        reg.kill()
        _out, err = push.communicate(timeout=300)
        assert push.returncode != 0, "the push cannot have succeeded"
        assert "pushing output" in err
        reg.start()  # the same storage, after the crash
        b = dataclasses.replace(project, cache=tmp_path / "cache-b")
        _config(b, reg.address, trusted=[keys["builder-a"][1]], push=False)
        got = _build(b)["big"]
        assert got["status"] == "built" and got["remote"] is None  # a miss: no tag was ever written
        assert got["key"] == built["key"]
    finally:
        reg.stop()


def test_an_unreachable_registry_is_reported_once_and_everything_builds(project: Project) -> None:
    from services import free_port

    project.add("liba", "make")
    project.add("libb", "autotools", ["liba"])
    _config(project, f"127.0.0.1:{free_port()}", push=False)  # nothing listens there
    res = project.hadron("build", check=True)
    assert res.stderr.count("remote cache unavailable") == 1
    assert "liba: built in" in res.stderr and "libb: built in" in res.stderr
