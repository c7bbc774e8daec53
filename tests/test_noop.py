"""The no-op memo (hadron.noop): a repeated `hadron build` is answered without loading recipes, and
every change that can change a key still reaches the full build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Project

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def statuses(p: Project) -> dict[str, str]:
    res = p.hadron("build", "--json", check=True)
    return {n: v["status"] for n, v in json.loads(res.stdout)["packages"].items()}


def imports_of_build(p: Project) -> str:
    """The modules a `hadron build` imports (python -X importtime)."""
    env = dict(os.environ, HADRON_CACHE=str(p.cache), HADRON_MIRRORS="")
    res = subprocess.run([sys.executable, "-X", "importtime", "-m", "hadron", "build", "--json"], cwd=p.root,
                         env=env, text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


@pytest.fixture
def tooled(project: Project, tmp_path: Path) -> Project:
    """Two packages built with a toolchain profile `t`; `solo` needs a host program of the project's own,
    found through hadron.toml's [build_env] path."""
    tools = tmp_path / "hosttools"
    tools.mkdir()
    (tools / "hadron-test-tool").write_text("#!/bin/sh\necho one\n")
    (tools / "hadron-test-tool").chmod(0o755)
    (project.root / "hadron.toml").write_text(f'[build]\ntoolchain = "t"\n\n[build_env]\npath = ["{tools}"]\n')
    profiles = project.root / "distro" / "toolchains"
    profiles.mkdir(parents=True)
    (profiles / "t.toml").write_text('name = "t"\nsummary = "test profile"\n\n[env]\nHADRON_TEST_FLAG = "1"\n')
    project.add("liba", "make")
    project.add("solo", "make", extra='host = ["hadron-test-tool"]\n')
    for name in ("liba", "solo"):
        recipe = project.packages / f"{name}.toml"
        recipe.write_text(recipe.read_text().replace("toolchain = false", "toolchain = true"))
    return project


def test_noop_is_answered_without_loading_recipes(tooled: Project) -> None:
    assert statuses(tooled) == {"liba": "built", "solo": "built"}
    assert list((tooled.cache / "plans").glob("*.json"))
    imported = imports_of_build(tooled)
    assert "hadron.noop" in imported
    for heavy in ("pydantic", "hadron.engine.recipe", "hadron.context", "rich"):
        assert f" {heavy}\n" not in imported, f"a no-op build imported {heavy}"
    assert statuses(tooled) == {"liba": "cached", "solo": "cached"}


def test_recipe_edit_is_noticed(tooled: Project) -> None:
    statuses(tooled)
    recipe = tooled.packages / "liba.toml"
    recipe.write_text(recipe.read_text().replace('summary = "synthetic make package"', 'summary = "reworded"'))
    assert statuses(tooled) == {"liba": "built", "solo": "cached"}
    assert " pydantic\n" not in imports_of_build(tooled)  # and the next no-op is fast again


def test_changed_source_digest_is_noticed(tooled: Project) -> None:
    statuses(tooled)
    tooled.add("solo", "make", work=1, extra='host = ["hadron-test-tool"]\n')
    recipe = tooled.packages / "solo.toml"
    recipe.write_text(recipe.read_text().replace("toolchain = false", "toolchain = true"))
    assert statuses(tooled) == {"liba": "cached", "solo": "built"}


def test_changed_host_tool_is_noticed(tooled: Project, tmp_path: Path) -> None:
    statuses(tooled)
    tool = tmp_path / "hosttools" / "hadron-test-tool"
    tool.write_text("#!/bin/sh\necho two\n")
    assert statuses(tooled) == {"liba": "cached", "solo": "built"}


def test_changed_toolchain_profile_is_noticed(tooled: Project) -> None:
    statuses(tooled)
    profile = tooled.root / "distro" / "toolchains" / "t.toml"
    profile.write_text(profile.read_text().replace('HADRON_TEST_FLAG = "1"', 'HADRON_TEST_FLAG = "2"'))
    assert statuses(tooled) == {"liba": "built", "solo": "built"}


def test_new_recipe_and_removed_output_are_noticed(tooled: Project) -> None:
    first = json.loads(tooled.hadron("build", "--json", check=True).stdout)["packages"]
    tooled.add("extra", "make")
    assert statuses(tooled) == {"liba": "cached", "solo": "cached", "extra": "built"}
    shutil.rmtree(first["solo"]["output"])
    assert statuses(tooled) == {"liba": "cached", "solo": "built", "extra": "cached"}


def test_a_failed_build_is_not_answered_from_an_older_record(tooled: Project) -> None:
    statuses(tooled)
    recipe = tooled.packages / "solo.toml"
    good = recipe.read_text()
    recipe.write_text(good.replace('make_args = ["SYSROOT=/sysroot"]', 'make_args = ["nonexistent"]'))
    assert tooled.hadron("build").returncode == 1
    assert tooled.hadron("build").returncode == 1
    recipe.write_text(good)
    assert statuses(tooled) == {"liba": "cached", "solo": "cached"}


def test_changed_configuration_is_noticed(tooled: Project) -> None:
    statuses(tooled)
    profiles = tooled.root / "distro" / "toolchains"
    (profiles / "u.toml").write_text((profiles / "t.toml").read_text().replace('name = "t"', 'name = "u"'))
    assert statuses(tooled) == {"liba": "cached", "solo": "cached"}
    config = tooled.root / "hadron.toml"
    config.write_text(config.read_text().replace('toolchain = "t"', 'toolchain = "u"'))
    assert statuses(tooled) == {"liba": "built", "solo": "built"}


def test_an_edit_made_while_building_is_noticed(tooled: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo holds the inputs as they were when the build read them, not as they are when it ends."""
    from hadron import noop, service

    statuses(tooled)
    recipe = tooled.packages / "liba.toml"
    real_build = service.build

    def build_then_edit(ctx, targets, quiet=False):  # type: ignore[no-untyped-def]
        outcome = real_build(ctx, targets, quiet=quiet)
        recipe.write_text(recipe.read_text().replace('summary = "synthetic make package"', 'summary = "edited"'))
        return outcome

    monkeypatch.setattr(service, "build", build_then_edit)
    monkeypatch.chdir(tooled.root)
    monkeypatch.setenv("HADRON_MIRRORS", "")
    monkeypatch.setenv("HADRON_CACHE", str(tooled.cache))
    monkeypatch.delenv("HADRON_CONFIG", raising=False)
    req = noop.Request.make([], [], None, None)  # as `hadron build` makes it
    noop.forget(req)  # a full build, as if something had changed
    assert service.build_request(req, quiet=True)["ok"]
    monkeypatch.undo()
    assert statuses(tooled) == {"liba": "built", "solo": "cached"}
