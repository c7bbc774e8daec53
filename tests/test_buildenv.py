"""The hermetic build environment: made by mmdebstrap, identified by digest, shared through a
registry; package builds run in it and their keys hash its digest, not the host's programs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import Project
from hadron import host
from hadron.engine import buildenv
from hadron.errors import HadronError
from hadron.layout import CacheLayout

# A package that proves where it was built: it fails when a host-only program is visible, and
# installs the environment's own description (so its output digest depends on the environment).
PROBE = """name = "probe"
version = "1"
summary = "reports the build environment"
license = "MIT"
homepage = "https://example.org"
[build]
system = "custom"
build = '''
if [ -e /usr/bin/qemu-system-x86_64 ] || [ -e /usr/bin/docker ]; then echo "host programs visible" >&2; exit 1; fi
gcc --version | head -1 > gcc-version
'''
install = '''
install -Dm644 gcc-version "$DESTDIR/usr/share/probe/gcc-version"
install -Dm644 /usr/share/hadron/buildenv.json "$DESTDIR/usr/share/probe/buildenv.json"
'''
[depends]
toolchain = false
"""


def test_build_env_packages_are_the_table_section() -> None:
    pkgs = host.build_env_packages()
    assert {"gcc", "make", "meson", "python3", "libc6-dev"} <= set(pkgs)
    # Boot, disk, test and host-only programs stay out of the environment.
    assert not {"qemu-system-x86", "bubblewrap", "docker.io", "skopeo", "ovmf"} & set(pkgs)


def test_resolve_follows_links_inside_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "e" / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/alternatives").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    real = root / "usr/bin/gcc-12"
    real.write_text("#!/bin/sh\n")
    real.chmod(0o755)
    (root / "etc/alternatives/cc").symlink_to("/usr/bin/gcc-12")  # absolute: inside the tree, not the host
    (root / "usr/bin/cc").symlink_to("/etc/alternatives/cc")
    (root / "usr/bin/loop").symlink_to("loop")
    env = buildenv.BuildEnv("sha256:" + "0" * 64, tmp_path / "e")
    assert env.resolve("/bin/cc") == real
    assert env.which("cc", "/usr/local/bin:/bin") == "/bin/cc"
    assert env.which("loop", "/usr/bin") is None
    assert env.which("sh", "/usr/bin") is None  # the host has one; the tree does not


def test_the_search_path_is_part_of_the_identity(tmp_path: Path) -> None:
    env = buildenv.BuildEnv("sha256:" + "1" * 64, tmp_path / "e")
    tools = f"{buildenv.TOOLS_VENV}/bin"
    # The environment's own tools are searched whether or not the project names them ...
    assert buildenv.extra_path(()) == (tools,)
    assert buildenv.extra_path((tools,)) == (tools,)
    assert buildenv.extra_path(("/opt/x/bin",)) == ("/opt/x/bin", tools)
    default = buildenv.LockedIdentity(env, buildenv.search_path(())).identity(["meson"])
    assert default == f"buildenv:{env.digest}"
    assert buildenv.LockedIdentity(env, buildenv.search_path((tools,))).identity(["meson"]) == default
    # ... and another PATH (another meson first) is another identity, so other keys.
    other = buildenv.LockedIdentity(env, buildenv.search_path(("/opt/x/bin",))).identity(["meson"])
    assert other != default and env.digest in other


def test_bad_lock_is_refused_with_the_file_named(tmp_path: Path) -> None:
    (tmp_path / "buildenv.lock").write_text('{"digest": "sha256:abc"}')
    with pytest.raises(HadronError) as e:
        buildenv.read_lock(tmp_path)
    assert "buildenv.lock" in e.value.message
    assert buildenv.read_lock(tmp_path / "nowhere") is None


def test_locked_refuses_an_environment_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = buildenv.EnvLock("sha256:" + "1" * 64, "bookworm", 1, ("gcc",), {"pip-1-py3-none-any.whl": "aa"},
                            {"gcc": "12.2.0-14"})
    (tmp_path / "buildenv.lock").write_text(lock.to_json())
    other = tmp_path / "cache" / "buildenv" / ("2" * 64)
    (other / "rootfs" / "usr/share/hadron").mkdir(parents=True)
    (other / "rootfs" / buildenv.DESCRIPTION).write_text(json.dumps(
        {"suite": "bookworm", "source_date_epoch": 1, "packages": ["gcc"], "wheels": {"pip-1-py3-none-any.whl": "aa"},
         "installed": {"gcc": "12.2.0-14+deb12u1"}}))
    (other / "env.json").write_text("{}")
    made = buildenv.BuildEnv("sha256:" + "2" * 64, other)
    monkeypatch.setattr(buildenv, "make", lambda *a, **kw: (made, True))
    layout = CacheLayout(tmp_path / "cache")
    with pytest.raises(HadronError) as e:
        buildenv.ensure(layout, tmp_path, remote=None, locked=True)
    assert "gcc 12.2.0-14 -> 12.2.0-14+deb12u1" in e.value.message
    warnings: list[str] = []
    assert buildenv.ensure(layout, tmp_path, remote=None, warn=warnings.append) == made
    assert "cache keys will differ" in warnings[0]


def _needs_mmdebstrap() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap --mode=root)")
    for tool in ("mmdebstrap", "skopeo", "docker-registry"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed ({host.install_hint([tool])})")


def _packages(res_stdout: str) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = json.loads(res_stdout)["packages"]
    return out


def test_two_machines_share_keys_and_outputs_through_the_environment(project: Project, registry: str,
                                                                       tmp_path: Path) -> None:
    """Machine A makes the environment, locks it, builds and pushes the environment; machine B
    (another cache) pulls it by digest and builds the same keys and byte-identical outputs."""
    _needs_mmdebstrap()
    env, new = buildenv.make(CacheLayout(project.cache), 1735689600)
    assert new and env.digest.startswith("sha256:")
    buildenv.write_lock(project.root, env)
    project.add("liba", "make")
    project.add("appc", "meson", ["liba"])
    (project.packages / "probe.toml").write_text(PROBE)

    a = project.hadron("build", "--json", check=True)
    pkgs_a = _packages(a.stdout)
    assert {p["status"] for p in pkgs_a.values()} == {"built"}
    manifest = json.loads((Path(str(pkgs_a["probe"]["output"])) / "manifest.json").read_text())
    assert manifest["build_env"] == f"buildenv:{env.digest}"
    assert manifest["env_identity"] == f"buildenv:{env.digest}"
    probe = Path(str(pkgs_a["probe"]["output"])) / "runtime/usr/share/probe"
    assert json.loads((probe / "buildenv.json").read_text())["packages"] == host.build_env_packages()

    remote = f"{registry}/hadron/buildenv"
    assert buildenv.push(env, remote, tls_verify=False) == f"{remote}@{env.digest}"

    (project.root / "hadron.toml").write_text(f'[build_env]\nremote = "{remote}"\ntls_verify = false\n')
    b_project = dataclasses.replace(project, cache=tmp_path / "cache-b")
    b = b_project.hadron("build", "--json", check=True)
    pkgs_b = _packages(b.stdout)
    assert {p["status"] for p in pkgs_b.values()} == {"built"}
    assert buildenv.find(CacheLayout(b_project.cache), env.digest) is not None  # pulled, not rebuilt
    for name in ("liba", "appc", "probe"):
        assert pkgs_a[name]["key"] == pkgs_b[name]["key"], name
        digest_a = (Path(str(pkgs_a[name]["output"])) / "digest").read_text()
        digest_b = (Path(str(pkgs_b[name]["output"])) / "digest").read_text()
        assert digest_a == digest_b, name

    # The host environment gives other keys: the digest, not the host's programs, is in the key.
    os.environ["HADRON_BUILD_ENV"] = "host"
    try:
        h = b_project.hadron("build", "--json")
    finally:
        del os.environ["HADRON_BUILD_ENV"]
    assert h.returncode != 0  # the probe sees the host's qemu/docker and refuses
    pkgs_h = _packages(h.stdout)
    assert pkgs_h["liba"]["key"] != pkgs_a["liba"]["key"]
    assert pkgs_h["probe"]["status"] == "failed"
