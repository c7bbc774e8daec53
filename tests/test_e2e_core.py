"""The real distribution, end to end: the core image from upstream sources with the host toolchain
profile and the cloud kernel, checked with skopeo/umoci/docker and booted in QEMU to
multi-user.target with zero failed units. Marked e2e (tens of minutes cold); CI runs it."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN = os.environ.get("HADRON_E2E_TOOLCHAIN", "host")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(5400),  # a cold build of the whole image, kernel included
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap"),
]


def hadron(*args: str, timeout: float = 5400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hadron", *args, "--toolchain", TOOLCHAIN], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def core() -> dict[str, object]:
    t0 = time.monotonic()
    res = hadron("build", "core", "--json")
    if res.returncode != 0:
        pytest.fail(f"hadron build core failed:\n{res.stdout[-6000:]}\n{res.stderr[-4000:]}")
    data = json.loads(res.stdout)
    info = data["images"]["core"]
    print(f"\nbuild of core ({TOOLCHAIN} toolchain): {time.monotonic() - t0:.0f}s, "
          f"rootfs {info['rootfs_bytes'] / 1e6:.1f} MB, OCI layer {info['oci']['layer_size'] / 1e6:.1f} MB")
    t1 = time.monotonic()
    again = hadron("build", "core", "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout)["images"]["core"]["cached"] is True
    print(f"no-op rebuild of core: {time.monotonic() - t1:.2f}s")
    assert isinstance(info, dict)
    return info


def test_rootfs_content(core: dict[str, object]) -> None:
    rootfs = Path(str(core["path"])) / "rootfs"
    osr = (rootfs / "usr/lib/os-release").read_text()
    assert "ID=hadron" in osr and "VERSION_ID=" in osr and "SYSEXT_LEVEL=" in osr
    for d in ("bin", "sbin", "lib"):
        assert (rootfs / d).is_symlink() and os.readlink(rootfs / d) == f"usr/{d}"
    assert (rootfs / "usr/lib/systemd/systemd").is_file()
    # musl's dynamic loader is its libc.so (an absolute link, valid inside the image).
    assert os.readlink(rootfs / "usr/lib/ld-musl-x86_64.so.1") == "/usr/lib/libc.so"
    assert (rootfs / "usr/lib/libc.so").is_file()
    release = core["kernel_release"]
    assert (rootfs / f"boot/vmlinuz-{release}").is_file()
    assert os.readlink(rootfs / "boot/vmlinuz") == f"vmlinuz-{release}"
    assert (rootfs / f"usr/lib/modules/{release}").is_dir()
    # Runtime outputs only: no headers, static libraries, pkg-config files or documentation.
    for pattern in ("usr/include", "usr/lib/pkgconfig", "usr/share/man", "usr/share/doc"):
        assert not (rootfs / pattern).exists(), pattern
    assert not list(rootfs.glob("usr/lib/*.a"))
    passwd = (rootfs / "etc/passwd").read_text()
    assert passwd.startswith("root:") and "systemd-journal" in (rootfs / "etc/group").read_text()
    comps = json.loads((rootfs / "usr/share/hadron/components.json").read_text())["components"]
    assert {"musl", "systemd", "busybox", "linux-cloud"} <= {c["name"] for c in comps}
    for dirpath, _dirs, files in os.walk(rootfs):
        for f in files:
            st = (Path(dirpath) / f).lstat()
            assert not (stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID)), f


def test_oci_with_skopeo_umoci_and_docker(core: dict[str, object], tmp_path: Path) -> None:
    path = Path(str(core["path"]))
    meta = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{path / 'oci'}:0.1"], capture_output=True,
                                     text=True, check=True).stdout)
    assert meta["Architecture"] == "amd64"
    subprocess.run(["umoci", "unpack", "--image", f"{path / 'oci'}:0.1", str(tmp_path / "b")], check=True,
                   capture_output=True)
    assert (tmp_path / "b/rootfs/usr/lib/os-release").is_file()
    docker = "/usr/bin/docker"
    if not Path(docker).exists() or subprocess.run([docker, "info"], capture_output=True).returncode != 0:
        pytest.skip("no docker daemon")
    subprocess.run([docker, "load", "-i", str(path / "docker-archive.tar")], check=True, capture_output=True)
    res = subprocess.run([docker, "run", "--rm", "--network=none", "hadron/core:0.1", "/bin/sh", "-c",
                          ". /usr/lib/os-release; echo $ID $VERSION_ID"], capture_output=True, text=True)
    assert res.stdout.strip() == "hadron 0.1", res.stderr


def test_boots_to_multi_user_with_zero_failed_units(core: dict[str, object]) -> None:
    res = hadron("boot", "core", "--check", "--json", "--timeout", "900")
    info = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    assert res.returncode == 0 and info.get("ok"), f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    print(f"\ntime to multi-user.target (QEMU TCG start to report): {info['seconds_to_multi_user']:.1f}s")
