"""The host package table: every program anything asks for has a row, and errors name the package."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from hadron import host
from hadron.boot import disk, grub, immutable, initrd, qemu, secureboot, trusted
from hadron.engine import buildenv, buildkit, remote, sandbox, signatures
from hadron.engine.recipe import load_recipes
from hadron.engine.scheduler import SYSTEM_TOOLS
from hadron.engine.toolchain import load_toolchain
from hadron.image import assembly, oci
from hadron.lifecycle import sysext, sysext_check, update, update_check
from hadron.trust import keys, registry, repro

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "hadron"
# Modules that run host programs through hadron.runner, and what each declares it runs.
DECLARED = {
    "image/assembly.py": assembly.HOST_TOOLS,
    "image/oci.py": oci.HOST_TOOLS,
    "boot/disk.py": disk.HOST_TOOLS,
    "boot/qemu.py": (*qemu.HOST_TOOLS, "swtpm"),
    "boot/secureboot.py": secureboot.HOST_TOOLS,
    "boot/trusted.py": trusted.HOST_TOOLS,
    "boot/initrd.py": initrd.HOST_TOOLS,
    "engine/sandbox.py": sandbox.HOST_TOOLS,
    "engine/buildenv.py": buildenv.HOST_TOOLS,
    "engine/remote.py": remote.HOST_TOOLS,
    "trust/keys.py": keys.HOST_TOOLS,
    "trust/registry.py": registry.HOST_TOOLS,
    "engine/buildkit.py": buildkit.HOST_TOOLS,
    "boot/immutable.py": immutable.HOST_TOOLS,
    "lifecycle/sysext.py": sysext.HOST_TOOLS,
    "lifecycle/sysext_check.py": sysext_check.HOST_TOOLS,
    "lifecycle/update.py": update.HOST_TOOLS,
    "lifecycle/update_check.py": update_check.HOST_TOOLS,
    "engine/signatures.py": signatures.HOST_TOOLS,
    "trust/repro.py": repro.HOST_TOOLS,
}


def named_by_data() -> dict[str, str]:
    """Every host program the recipes, toolchain profiles and build-system helpers name → where."""
    found: dict[str, str] = {t: "hadron.host.BASE_HOST_TOOLS" for t in host.BASE_HOST_TOOLS}
    for system, tools in SYSTEM_TOOLS.items():
        found.update({t: f"build system {system}" for t in tools})
    for name, lr in load_recipes([ROOT / "distro" / "packages"]).items():
        found.update({t: f"recipe {name}" for t in lr.recipe.depends.host})
    for profile in (ROOT / "distro" / "toolchains").glob("*.toml"):
        found.update({t: f"toolchain {profile.stem}" for t in load_toolchain(ROOT, profile.stem).host_tools})
    return found


def runner_calls(path: Path) -> set[str]:
    """Program names a module passes to runner.run([...]) or runner.tool(...) as literals."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "runner" and node.args):
            continue
        arg = node.args[0]
        if node.func.attr == "run" and isinstance(arg, ast.List) and arg.elts:
            arg = arg.elts[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
    return names


def test_every_program_the_data_names_has_a_row() -> None:
    missing = {t: who for t, who in named_by_data().items() if t not in host.table()}
    assert not missing, f"add rows to {host.TABLE} for: {missing}"


def test_every_program_the_code_runs_is_declared_and_has_a_row() -> None:
    modules = {p.relative_to(SRC).as_posix(): runner_calls(p) for p in SRC.rglob("*.py")}
    runs = {m: names for m, names in modules.items() if names}
    assert runs, "no runner calls found: the scan is broken"
    undeclared = set(runs) - set(DECLARED)
    assert not undeclared, f"modules that run host programs without a declaration: {undeclared}"
    for module, names in runs.items():
        assert names <= set(DECLARED[module]), f"{module} runs {names - set(DECLARED[module])} without declaring them"
    declared = {t for ts in DECLARED.values() for t in ts}
    needs = set(grub.HOST_NEEDS) | set(trusted.HOST_NEEDS) | set(immutable.HOST_NEEDS) | set(qemu.DIRECT_BOOT_NEEDS)
    assert not (declared | needs) - set(host.table()), f"no row for {(declared | needs) - set(host.table())}"


def test_every_program_tests_and_benchmarks_look_for_has_a_row() -> None:
    pattern = re.compile(r"""shutil\.which\(\s*["']([^"']+)["']""")
    asked = {m for d in ("tests", "bench") for p in (ROOT / d).glob("*.py") for m in pattern.findall(p.read_text())}
    assert "docker-registry" in asked  # the scan sees the tests
    assert not asked - set(host.table()), f"no row for {asked - set(host.table())}"


def test_table_rows_are_well_formed() -> None:
    rows = host.table()
    assert rows["depmod"].package == "kmod"
    for name, row in rows.items():
        assert re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", row.package), f"{name}: {row.package!r} is not a package name"
        assert not name.startswith("/") or Path(name).is_absolute()


def test_missing_program_error_names_the_real_package() -> None:
    err = host.missing_tools_error({"depmod": ["linux-cloud (distro/packages/linux-cloud/recipe.toml)"]})
    assert "depmod: needed by linux-cloud" in err.message
    assert err.hint is not None and "apt-get install kmod " in err.hint and "depmod" not in err.hint.split("(")[0]
    err = host.missing_tools_error({"hadron-no-such-tool": ["solo"]})
    assert err.hint is not None and "no Debian package is known for hadron-no-such-tool" in err.hint


def test_runner_names_the_package_and_the_failing_command(tmp_path: Path) -> None:
    from hadron import runner
    from hadron.errors import HadronError

    with pytest.raises(HadronError) as e:
        runner.tool("hadron-no-such-tool")
    assert "hadron-no-such-tool is not installed" in e.value.message
    if shutil.which("sfdisk") is None:
        pytest.skip("needs sfdisk")
    with pytest.raises(HadronError) as e:
        runner.run(["sfdisk", "--json", tmp_path / "absent.img"], what="reading a partition table")
    assert e.value.message.startswith("reading a partition table failed (exit status 1):")
    assert "absent.img" in e.value.message and e.value.hint is not None and "command: " in e.value.hint
