"""The command line: every verb that builds takes the same build options with the same defaults, and
`cache gc` keeps what its flags say."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click
import pytest

from conftest import Project
from hadron.cli import main

BUILDING_VERBS = [("build",), ("boot",), ("push",), ("image", "uki"), ("image", "disk")]
BUILD_OPTIONS = {"jobs": None, "offline": False, "keep_going": True, "no_check": False}


def command(path: tuple[str, ...]) -> click.Command:
    cmd: click.Command = main
    for name in path:
        assert isinstance(cmd, click.Group)
        found = cmd.get_command(click.Context(cmd), name)
        assert found is not None, f"no command {' '.join(path)}"
        cmd = found
    return cmd


@pytest.mark.parametrize("path", BUILDING_VERBS, ids=" ".join)
def test_every_building_verb_takes_the_same_build_options(path: tuple[str, ...]) -> None:
    cmd = command(path)
    params = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for name, default in BUILD_OPTIONS.items():
        assert name in params, f"`hadron {' '.join(path)}` lacks the build option {name}"
        got = params[name].get_default(click.Context(cmd))
        assert got == default, f"`hadron {' '.join(path)}`: {name} defaults to {got}"
    assert {"--keep-going", "--fail-fast"} <= set(params["keep_going"].opts + params["keep_going"].secondary_opts)
    assert "-j" in params["jobs"].opts


def test_build_and_fetch_help_name_the_default_image() -> None:
    for path in (("build",), ("fetch",)):
        assert "default image" in (command(path).help or "")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_gc_keeps_all_current_or_only_the_targets(project: Project) -> None:
    project.add("liba", "make")
    project.add("appc", "make", ["liba"])
    project.add("solo", "make")
    outs = {n: Path(p["output"]) for n, p in
            json.loads(project.hadron("build", "--json", check=True).stdout)["packages"].items()}
    res = json.loads(project.hadron("cache", "gc", "--json", check=True).stdout)
    assert res["removed"] == 0 and all(p.is_dir() for p in outs.values())
    assert project.hadron("cache", "gc", "appc").returncode == 1  # TARGETS without --only-targets
    res = json.loads(project.hadron("cache", "gc", "--only-targets", "appc", "--json", check=True).stdout)
    assert res["removed"] == 1 and outs["appc"].is_dir() and outs["liba"].is_dir() and not outs["solo"].exists()
