"""Image assembly and OCI output, checked with real tools: skopeo, umoci, a registry, docker."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import HELLO_C, Project, add_image, add_static_hello
from synth import make_tarball

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def build_image(p: Project, name: str) -> dict[str, object]:
    res = p.hadron("build", name, "--json", check=True)
    data = json.loads(res.stdout)["images"][name]
    assert isinstance(data, dict)
    return data


def test_image_layout_rootfs_and_oci(mini: Project, tmp_path: Path) -> None:
    info = build_image(mini, "mini")
    path = Path(str(info["path"]))
    rootfs = path / "rootfs"
    # usrmerge, os-release, component manifest, stripped binaries.
    assert os.readlink(rootfs / "bin") == "usr/bin" and os.readlink(rootfs / "lib") == "usr/lib"
    assert (rootfs / "usr/bin/hi").is_symlink()
    osr = (rootfs / "usr/lib/os-release").read_text()
    assert "ID=hadron\n" in osr and "VERSION_ID=0.1\n" in osr and "SYSEXT_LEVEL=1\n" in osr
    comps = json.loads((rootfs / "usr/share/hadron/components.json").read_text())["components"]
    assert comps[0]["name"] == "hello" and comps[0]["license"] == "MIT"
    assert len(comps[0]["sources"][0]["sha256"]) == 64
    assert b".debug_info" not in (rootfs / "usr/bin/hello").read_bytes()
    assert not (rootfs / "etc/machine-id").exists() or (rootfs / "etc/machine-id").read_text() == ""
    # skopeo reads the layout; umoci unpacks it.
    oci = path / "oci"
    res = subprocess.run(["skopeo", "inspect", f"oci:{oci}:0.1"], capture_output=True, text=True, check=True)
    meta = json.loads(res.stdout)
    assert meta["Architecture"] == "amd64" and meta["Os"] == "linux" and len(meta["Layers"]) == 1
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{oci}:0.1", str(bundle)], check=True, capture_output=True)
    out = subprocess.run([str(bundle / "rootfs/usr/bin/hello")], capture_output=True, text=True)
    assert out.stdout == "hello from hadron\n"
    # The docker archive holds the same layer, uncompressed (its digest is the layer's diff_id).
    res = subprocess.run(["skopeo", "inspect", f"docker-archive:{path / 'docker-archive.tar'}"],
                         capture_output=True, text=True, check=True)
    oci_info = info["oci"]
    assert isinstance(oci_info, dict)
    assert json.loads(res.stdout)["Layers"] == [oci_info["diff_id"]]


def test_layer_is_reproducible_sorted_clamped_rootowned(mini: Project, tmp_path: Path) -> None:
    first = build_image(mini, "mini")
    # A second cache: everything is rebuilt from scratch, digests are identical.
    other = Project(mini.root, tmp_path / "cache2", mini.url, mini.hits)
    second = build_image(other, "mini")
    assert first["path"] != second["path"]
    assert first["oci"] == second["oci"]
    layout = Path(str(first["path"])) / "oci"
    oci_info = first["oci"]
    assert isinstance(oci_info, dict)
    layer = layout / "blobs/sha256" / str(oci_info["layer"]).removeprefix("sha256:")
    assert hashlib.sha256(layer.read_bytes()).hexdigest() == str(oci_info["layer"]).removeprefix("sha256:")
    with tarfile.open(layer) as tf:
        members = tf.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    epoch = 1735689600
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "" and m.gname == "" for m in members)
    assert all(m.mtime <= epoch for m in members)


def test_setuid_outside_the_allow_list_is_refused(project: Project) -> None:
    add_static_hello(project, "suid", setuid=True)
    add_image(project, "bad", ["suid"])
    res = project.hadron("build", "bad")
    assert res.returncode == 1
    assert "setuid/setgid files not in the allow-list" in res.stderr and "/usr/bin/hello (0o4755)" in res.stderr
    add_image(project, "good", ["suid"], 'setuid_allowed = ["usr/bin/hello"]\n')
    assert project.hadron("build", "good").returncode == 0


def test_shared_path_needs_replaces_then_the_replacing_package_wins(mini: Project) -> None:
    # "other" installs the same /usr/bin/hello as "hello", and its hi in /usr/sbin, not /bin.
    digest = make_tarball(mini.dist / "other-1.tar.gz", "other-1",
                          {"hello.c": HELLO_C.replace("hello from hadron", "other wins")})
    recipe = (mini.packages / "hello.toml").read_text().replace('name = "hello"', 'name = "other"')
    recipe = recipe.replace("hello-1.tar.gz", "other-1.tar.gz").split("sha256 = ")[0] + f'sha256 = "{digest}"\n' + \
        'unsigned = "a test file: no upstream signature"\n' + \
        "[build]" + recipe.split("[build]")[1].replace('ln -s ../usr/bin/hello "$DESTDIR/bin/hi"',
                                                      'install -Dm755 hello "$DESTDIR/usr/sbin/hi"')
    (mini.packages / "other.toml").write_text(recipe)
    add_image(mini, "both", ["hello", "other"])
    res = mini.hadron("build", "both")
    assert res.returncode == 1 and "/usr/bin/hello is installed by both" in res.stderr
    assert "replaces" in res.stderr
    # A child image: the parent's packages and fields, plus its own, with one package replacing another.
    images = mini.root / "distro" / "images"
    (images / "child.toml").write_text(
        'name = "child"\nextends = "mini"\nsummary = "child"\npackages = ["other"]\nboot = ["grub"]\n'
        'replaces = { other = ["hello"] }\n')
    info = build_image(mini, "child")
    rootfs = Path(str(info["path"])) / "rootfs"
    out = subprocess.run([str(rootfs / "usr/bin/hello")], capture_output=True, text=True)
    assert out.stdout == "other wins\n"
    # replaces covers a program's name: hello's hi (/bin/hi, now /usr/bin/hi) is gone, other's
    # /usr/sbin/hi stays, and no record lists the dropped file.
    assert not (rootfs / "usr/bin/hi").exists() and not (rootfs / "usr/bin/hi").is_symlink()
    out = subprocess.run([str(rootfs / "usr/sbin/hi")], capture_output=True, text=True)
    assert out.stdout == "other wins\n"
    sbom_files = {f["fileName"] for f in json.loads((rootfs.parent / "sbom.spdx.json").read_text())["files"]}
    assert "./usr/sbin/hi" in sbom_files and "./usr/bin/hi" not in sbom_files
    comps = json.loads((rootfs / "usr/share/hadron/components.json").read_text())["components"]
    assert {c["name"] for c in comps} == {"hello", "other"}
    # replaces must name the image's packages; extends must name an image.
    (images / "child.toml").write_text(
        'name = "child"\nextends = "mini"\nsummary = "c"\nreplaces = { x = ["hello"] }\n')
    res = mini.hadron("build", "child")
    assert res.returncode == 1 and "replaces: x is not one of the image's packages" in res.stderr
    (images / "child.toml").write_text('name = "child"\nextends = "nope"\nsummary = "c"\n')
    res = mini.hadron("build", "child")
    assert res.returncode == 1 and "extends: no image named 'nope'" in res.stderr
    (images / "child.toml").write_text('name = "child"\nextends = "loop"\nsummary = "c"\n')
    (images / "loop.toml").write_text('name = "loop"\nextends = "child"\nsummary = "l"\n')
    res = mini.hadron("build", "child")
    assert res.returncode == 1 and "extends: a cycle: " in res.stderr


def test_image_is_cached(mini: Project) -> None:
    first = build_image(mini, "mini")
    again = build_image(mini, "mini")
    assert again["cached"] is True and again["key"] == first["key"]


def test_push_to_registry_and_read_back(mini: Project, registry: str) -> None:
    info = build_image(mini, "mini")
    ref = f"{registry}/hadron/mini:0.1"
    res = mini.hadron("push", ref, "--image", "mini", "--no-tls-verify", "--unsigned", "--json", check=True)
    assert json.loads(res.stdout)["pushed"] == ref
    res = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, text=True, check=True)
    oci_info = info["oci"]
    assert isinstance(oci_info, dict)
    assert json.loads(res.stdout)["Layers"] == [oci_info["layer"]]


def _docker_ok() -> bool:
    docker = shutil.which("docker", path="/usr/bin") or shutil.which("docker")
    if docker is None:
        return False
    return subprocess.run([docker, "info"], capture_output=True).returncode == 0


def test_docker_load_and_run(mini: Project) -> None:
    if not _docker_ok():
        pytest.skip("no docker daemon reachable (CI starts dockerd)")
    info = build_image(mini, "mini")
    archive = Path(str(info["path"])) / "docker-archive.tar"
    docker = shutil.which("docker", path="/usr/bin") or "docker"
    subprocess.run([docker, "load", "-i", str(archive)], check=True, capture_output=True)
    res = subprocess.run([docker, "run", "--rm", "--network=none", "hadron/mini:0.1"], capture_output=True, text=True)
    assert res.stdout == "hello from hadron\n", res.stderr


def test_update_stamps_match_usr_so_first_boot_skips_update_units(tmp_path: Path) -> None:
    """systemd's ConditionNeedsUpdate=/etc|/var is true when /usr is newer than <dir>/.updated."""
    from types import SimpleNamespace

    from hadron.image.assembly import mark_updated

    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/systemctl").write_text("")
    os.utime(root / "usr", ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    mark_updated(SimpleNamespace(rootfs=root))  # type: ignore[arg-type]
    usr = (root / "usr").stat().st_mtime_ns
    for d in ("etc", "var"):
        stamp = root / d / ".updated"
        assert stamp.stat().st_mtime_ns == usr
        assert f"TIMESTAMP_NSEC={usr}\n" in stamp.read_text()
    # An image without systemd gets no stamps.
    bare = tmp_path / "bare"
    (bare / "usr").mkdir(parents=True)
    mark_updated(SimpleNamespace(rootfs=bare))  # type: ignore[arg-type]
    assert not (bare / "etc/.updated").exists()


DLOPEN_C = r'''
#define DESC "[{\"feature\":\"tpm\",\"description\":\"Support for TPM\",\"priority\":\"suggested\"," \
  "\"soname\":[\"libtss2-esys.so.0\"]},{\"feature\":\"crypto\",\"priority\":\"required\"," \
  "\"soname\":[\"libcrypto.so.4\",\"libcrypto.so.3\"]}]"
struct note { unsigned namesz, descsz, type; char name[4]; char desc[(sizeof(DESC) + 3) & ~3]; };
__attribute__((section(".note.dlopen"), aligned(4), used))
static const struct note dlopen_note = { 4, sizeof(DESC), 0x407c0c0a, "FDO", DESC };
int main(void) { return 0; }
'''


def test_dlopen_metadata_names_libraries_the_image_must_carry(tmp_path: Path) -> None:
    """A program's .note.dlopen (systemd's libcrypto, tpm2-tss, libcryptsetup, ...) names libraries it
    loads at run time: assembly fails while one is missing, and passes once it is there or the image
    says why it is left out."""
    from types import SimpleNamespace

    from hadron.errors import HadronError
    from hadron.image.assembly import check_dlopen, dlopen_metadata

    root = tmp_path / "rootfs"
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/bin").mkdir(parents=True)
    (tmp_path / "prog.c").write_text(DLOPEN_C)
    subprocess.run(["cc", "-o", str(root / "usr/bin/prog"), str(tmp_path / "prog.c")], check=True)
    entries = dlopen_metadata(root / "usr/bin/prog")
    assert [e["feature"] for e in entries] == ["tpm", "crypto"]
    assert entries[1]["soname"] == ["libcrypto.so.4", "libcrypto.so.3"]
    notes: list[str] = []
    spec = SimpleNamespace(dlopen_absent={})
    b = SimpleNamespace(rootfs=root, image=SimpleNamespace(name="t", spec=spec, path=tmp_path / "t.toml"),
                        note=notes.append)
    with pytest.raises(HadronError) as ei:
        check_dlopen(b)  # type: ignore[arg-type]
    msg = str(ei.value)
    assert "libcrypto.so.4 | libcrypto.so.3: named by /usr/bin/prog (crypto, required)" in msg
    assert "libtss2-esys.so.0: named by /usr/bin/prog (tpm, suggested)" in msg
    assert "dlopen_absent" in ei.value.hint
    # one of the alternatives is enough; the other library is left out with a reason
    (root / "usr/lib/libcrypto.so.3").write_bytes(b"")
    spec.dlopen_absent = {"libtss2-esys.so.0": "no TPM on this machine class"}
    check_dlopen(b)  # type: ignore[arg-type]
    assert "2 entries naming 2 libraries" in notes[-1] and "libtss2-esys.so.0" in notes[-1]


def test_hard_links_stay_one_file_through_copy_and_strip(mini: Project, tmp_path: Path) -> None:
    """A package's hard links (e2fsprogs' e2fsck = fsck.ext4) are one stripped file in the image and
    in its OCI layer, and the image size counts it once."""
    recipe = mini.packages / "hello.toml"
    recipe.write_text(recipe.read_text().replace(
        'ln -s ../usr/bin/hello "$DESTDIR/bin/hi"',
        'ln -s ../usr/bin/hello "$DESTDIR/bin/hi"\nln "$DESTDIR/usr/bin/hello" "$DESTDIR/usr/bin/hello.twin"'))
    info = build_image(mini, "mini")
    rootfs = Path(str(info["path"])) / "rootfs"
    one, twin = (rootfs / "usr/bin/hello").stat(), (rootfs / "usr/bin/hello.twin").stat()
    assert (one.st_ino, one.st_nlink) == (twin.st_ino, 2)
    assert b".debug_info" not in (rootfs / "usr/bin/hello.twin").read_bytes()
    record = json.loads((Path(str(info["path"])) / "image.json").read_text())
    every_name = sum((Path(d) / f).lstat().st_size for d, _, fs in os.walk(rootfs) for f in fs)
    assert record["rootfs_bytes"] == every_name - one.st_size
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{Path(str(info['path'])) / 'oci'}:0.1", str(bundle)],
                   check=True, capture_output=True)
    a, b = (bundle / "rootfs/usr/bin/hello").stat(), (bundle / "rootfs/usr/bin/hello.twin").stat()
    assert a.st_ino == b.st_ino
