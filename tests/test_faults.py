"""Crash consistency and concurrent use of one cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Project
from hadron.engine.faults import POINTS

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")


def manifests(p: Project) -> dict[str, str]:
    data = json.loads(p.hadron("build", "--json", check=True).stdout)
    return {n: (Path(i["output"]) / "digest").read_text() for n, i in data["packages"].items()}


def assert_consistent(p: Project) -> None:
    """Every output in the cache is complete and verifies; nothing else is visible."""
    outs = p.cache / "outputs"
    if outs.exists():
        for o in outs.iterdir():
            assert (o / "digest").is_file() and (o / "manifest.json").is_file(), f"half-written output {o}"
    res = p.hadron("cache", "verify")
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_point_leaves_cache_consistent_and_resumes(project: Project, point: str) -> None:
    project.add("liba", "make")
    project.add("libb", "autotools", ["liba"])
    env = dict(os.environ, HADRON_CACHE=str(project.cache), HADRON_MIRRORS="", HADRON_FAULT=point)
    res = subprocess.run([sys.executable, "-m", "hadron", "build", "-j1"], cwd=project.root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    assert_consistent(project)
    # The next build resumes: what was committed is reused, the rest is built.
    resumed = json.loads(project.hadron("build", "--json", check=True).stdout)
    st = {n: i["status"] for n, i in resumed["packages"].items()}
    if point == "after-rename":
        assert st["liba"] == "cached"
    else:
        assert st["liba"] == "built"
    assert st["libb"] == "built"
    assert_consistent(project)
    project.hadron("cache", "gc", check=True)
    assert not any((project.cache / "tmp").iterdir()) and not (project.cache / "work").exists()


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_sigkill_during_build_steps(project: Project, delay: float) -> None:
    """Kill the whole process group at arbitrary moments while sandboxed steps run."""
    project.add("slow", "make", work=400, units=3)
    project.add("after", "make", ["slow"])
    p = project.popen("build", "-j2")
    time.sleep(delay)
    p.kill()
    p.wait()
    time.sleep(0.2)
    assert_consistent(project)
    res = json.loads(project.hadron("build", "--json", check=True).stdout)
    assert {i["status"] for i in res["packages"].values()} <= {"built", "cached"}
    assert_consistent(project)


def test_two_processes_share_one_cache(project: Project) -> None:
    project.add("liba", "make", work=200)
    project.add("libb", "autotools", ["liba"])
    project.add("appc", "meson", ["libb", "liba"])
    project.add("solo", "make", work=200)
    procs = [project.popen("build", "--json", "-j2") for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out)["packages"])
    a, b = results
    assert {n: i["key"] for n, i in a.items()} == {n: i["key"] for n, i in b.items()}
    assert {n: i["output"] for n, i in a.items()} == {n: i["output"] for n, i in b.items()}
    # Each package was built exactly once; the other process found it cached.
    for n in a:
        assert sorted([a[n]["status"], b[n]["status"]]) in (["built", "cached"], ["cached", "cached"]), n
    assert_consistent(project)
    assert len(list((project.cache / "outputs").iterdir())) == 4
