"""End-to-end engine tests on synthetic make-, autotools- and meson-style packages (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import Project

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def statuses(res_stdout: str) -> dict[str, str]:
    data = json.loads(res_stdout)
    return {n: p["status"] for n, p in data["packages"].items()}


def outputs(p: Project) -> dict[str, dict[str, object]]:
    """package → its manifest, for the current outputs."""
    res = p.hadron("build", "--json", check=True)
    data = json.loads(res.stdout)
    out = {}
    for n, info in data["packages"].items():
        out[n] = json.loads((Path(info["output"]) / "manifest.json").read_text())
    return out


@pytest.fixture
def three(project: Project) -> Project:
    project.add("liba", "make")
    project.add("libb", "autotools", ["liba"])
    project.add("appc", "meson", ["libb", "liba"])
    project.add("solo", "make")
    return project


def test_build_three_styles_then_noop(three: Project) -> None:
    res = three.hadron("build", "--json", check=True)
    assert statuses(res.stdout) == {"liba": "built", "libb": "built", "appc": "built", "solo": "built"}
    data = json.loads(res.stdout)["packages"]
    appc = Path(data["appc"]["output"])
    # Runtime and development outputs are split; documentation is dropped.
    assert (appc / "runtime/usr/bin/appc").is_file()
    assert (appc / "dev/usr/include/appc.h").is_file() and (appc / "dev/usr/lib/libappc.a").is_file()
    assert not (appc / "runtime/usr/include").exists()
    liba = Path(data["liba"]["output"])
    assert not (liba / "runtime/usr/share/doc").exists()
    libb = Path(data["libb"]["output"])
    assert (libb / "dev/usr/lib/pkgconfig/libb.pc").is_file()
    manifest = json.loads((appc / "manifest.json").read_text())
    assert manifest["isolation"].startswith("bwrap")
    assert set(manifest["inputs"]) == {"liba", "libb"}
    assert {"configure", "build", "install"} <= set(manifest["timings"])
    entry = next(e for e in manifest["files"] if e["path"] == "usr/bin/appc")
    assert entry["output"] == "runtime" and entry["mode"] == 0o755 and len(entry["sha256"]) == 64
    assert (appc / "build.log").read_text().startswith("==> appc 1.0 key ")

    hits = len(three.hits)
    res = three.hadron("build", "--json", check=True)
    assert set(statuses(res.stdout).values()) == {"cached"}
    assert len(three.hits) == hits  # nothing fetched again


def test_editing_a_leaf_rebuilds_it_and_its_reverse_dependencies(three: Project) -> None:
    three.hadron("build", check=True)
    three.add("liba", "make", work=1)  # new upstream code: liba's library changes
    res = three.hadron("build", "--json", check=True)
    assert statuses(res.stdout) == {"liba": "built", "libb": "built", "appc": "built", "solo": "cached"}


def test_early_cutoff_when_a_rebuilt_output_is_identical(three: Project) -> None:
    three.hadron("build", check=True)
    recipe = three.packages / "liba.toml"
    recipe.write_text(recipe.read_text().replace('summary = "synthetic make package"', 'summary = "reworded"'))
    res = three.hadron("build", "--json", check=True)
    assert statuses(res.stdout) == {"liba": "built", "libb": "cached", "appc": "cached", "solo": "cached"}


def test_changed_dependency_output_rebuilds_dependents(three: Project) -> None:
    three.hadron("build", check=True)
    recipe = three.packages / "liba.toml"
    recipe.write_text(recipe.read_text().replace('make_args = ["SYSROOT=/sysroot"]',
                                                 'make_args = ["SYSROOT=/sysroot", "CFLAGS=-O1"]'))
    res = three.hadron("build", "--json", check=True)
    assert statuses(res.stdout) == {"liba": "built", "libb": "built", "appc": "built", "solo": "cached"}


def test_failure_names_package_and_log_and_independent_work_continues(three: Project) -> None:
    recipe = three.packages / "libb.toml"
    recipe.write_text(recipe.read_text().replace('system = "autotools"',
                                                 'system = "autotools"\nconfigure_args = ["--bogus"]'))
    res = three.hadron("build")
    assert res.returncode == 1
    assert "FAILED libb: configure step failed (exit status 1)" in res.stderr
    log = three.cache / "logs" / "libb.log"
    assert f"log: {log}" in res.stderr
    assert "configure: unknown option --bogus" in log.read_text()
    js = json.loads(three.hadron("build", "--json").stdout)
    st = {n: p["status"] for n, p in js["packages"].items()}
    assert st == {"liba": "cached", "solo": "cached", "libb": "failed", "appc": "skipped"}
    # Nothing half-written is left in the cache.
    assert not any((three.cache / "tmp").iterdir())
    assert len(list((three.cache / "outputs").iterdir())) == 2


def test_fail_fast_starts_nothing_new(three: Project) -> None:
    recipe = three.packages / "liba.toml"
    recipe.write_text(recipe.read_text().replace('make_args = ["SYSROOT=/sysroot"]', 'make_args = ["nonexistent"]'))
    res = three.hadron("build", "--json", "--fail-fast", "-j1")
    st = statuses(res.stdout)
    assert res.returncode == 1 and st["liba"] == "failed"
    assert "built" not in st.values()


def test_tampered_source_is_refused(three: Project) -> None:
    tarball = three.dist / "liba-1.0.tar.gz"
    tarball.write_bytes(tarball.read_bytes() + b"\0")
    res = three.hadron("build", "liba")
    assert res.returncode == 1
    assert "sha256 mismatch" in res.stderr and three.digests["liba"] in res.stderr
    assert not (three.cache / "sources" / "sha256" / three.digests["liba"]).exists()


def test_cache_verify_reports_corruption(three: Project) -> None:
    res = three.hadron("build", "--json", check=True)
    assert three.hadron("cache", "verify").returncode == 0
    appc = Path(json.loads(res.stdout)["packages"]["appc"]["output"])
    binary = appc / "runtime/usr/bin/appc"
    binary.chmod(0o755)
    binary.write_bytes(b"corrupt")
    res = three.hadron("cache", "verify")
    assert res.returncode == 1
    assert f"CORRUPT {binary}: content changed" in res.stderr


def test_missing_host_tool_is_reported_up_front(three: Project) -> None:
    recipe = three.packages / "solo.toml"
    recipe.write_text(recipe.read_text() + 'host = ["hadron-no-such-tool"]\n')
    res = three.hadron("build")
    assert res.returncode == 1
    assert "lacks required program(s)" in res.stderr
    assert "hadron-no-such-tool: needed by solo" in res.stderr
    assert not (three.cache / "outputs").exists() or not any((three.cache / "outputs").iterdir())


def test_bad_recipe_is_reported_without_traceback(three: Project) -> None:
    (three.packages / "broken.toml").write_text('name = "broken"\nversion = 1\n')
    res = three.hadron("build")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert f"{three.packages / 'broken.toml'}: version: Input should be a valid string" in res.stderr
    assert "summary: required field is missing" in res.stderr


def test_graph_show_fetch(three: Project) -> None:
    tree = three.hadron("graph", "appc", check=True).stdout
    assert tree.splitlines()[0] == "appc 1.0"
    assert "libb 1.0" in tree
    assert '"appc" -> "libb"' in three.hadron("graph", "--dot", check=True).stdout
    res = three.hadron("fetch", "--json", check=True)
    assert json.loads(res.stdout)["ok"]
    assert three.hadron("fetch", "--offline", check=True).returncode == 0
    show = json.loads(three.hadron("show", "appc", "--json", check=True).stdout)
    assert show["cached"] is False and show["key"] is None
    three.hadron("build", check=True)
    show = json.loads(three.hadron("show", "appc", "--json", check=True).stdout)
    assert show["cached"] is True and len(show["key"]) == 64 and show["build_inputs"] == ["liba", "libb"]
    text = three.hadron("show", "appc", check=True).stdout
    assert "cached:  yes" in text
    res = three.hadron("show", "nope")
    assert res.returncode == 1 and "unknown package(s): nope" in res.stderr


def test_cycle_is_reported(project: Project) -> None:
    project.add("x", "make", ["y"])
    project.add("y", "make", ["x"])
    res = project.hadron("build")
    assert res.returncode == 1
    assert "dependency cycle: x -> y -> x" in res.stderr or "dependency cycle: y -> x -> y" in res.stderr


def test_extra_recipe_directory_overrides(three: Project, tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    text = (three.packages / "solo.toml").read_text().replace('version = "1.0"', 'version = "1.0.1"')
    (extra / "solo.toml").write_text(text)
    res = three.hadron("show", "solo", "--json", "--recipes", str(extra), check=True)
    assert json.loads(res.stdout)["recipe"]["version"] == "1.0.1"


def test_gc_removes_unreferenced_outputs(three: Project) -> None:
    three.hadron("build", check=True)
    recipe = three.packages / "solo.toml"
    recipe.write_text(recipe.read_text().replace('summary = "synthetic make package"', 'summary = "v2"'))
    three.hadron("build", check=True)
    assert len(list((three.cache / "outputs").iterdir())) == 5
    res = three.hadron("cache", "gc", "--json", check=True)
    assert json.loads(res.stdout)["removed"] == 1
    assert len(list((three.cache / "outputs").iterdir())) == 4
    assert set(statuses(three.hadron("build", "--json", check=True).stdout).values()) == {"cached"}


def test_key_covers_generated_steps_and_toolchain_profile(three: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build-system helper change (the shell steps it generates) and a toolchain profile change
    (its environment, not just its name) must change the cache key of what they reach."""
    from dataclasses import replace

    from hadron.config import load_settings
    from hadron.context import Context
    from hadron.engine import buildsys
    from hadron.engine.toolchain import Toolchain

    three.hadron("build", check=True)

    def key_of(name: str) -> str | None:
        ctx = Context(load_settings(project=three.root, cache_dir=three.cache))
        return ctx.planner.resolve_cached([name])[1].get(name)

    before = key_of("solo")
    assert before is not None and key_of("solo") == before
    orig = buildsys.phases
    monkeypatch.setattr(buildsys, "phases", lambda r, check=True: [
        replace(p, script=p.script + "# a helper change\n") for p in orig(r, check=check)])
    assert key_of("solo") not in (None, before)
    monkeypatch.setattr(buildsys, "phases", orig)
    assert key_of("solo") == before
    base = Toolchain("cross", ("gcc-cross",), ("/sysroot/toolchain/bin",), {"CFLAGS": "-O2"})
    assert base.digest() == Toolchain("cross", ("gcc-cross",), ("/sysroot/toolchain/bin",), {"CFLAGS": "-O2"}).digest()
    assert base.digest() != replace(base, env={"CFLAGS": "-O3"}).digest()
    assert base.digest() != replace(base, path=("/other",)).digest()
