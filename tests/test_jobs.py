"""CPU sharing: concurrent packages draw make jobs from one jobserver and never exceed --jobs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import Project
from hadron.engine.jobs import JobServer
from synth import make_tarball

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

# Six independent jobs; each records when it ran (wall clock, shared by all sandboxes).
MAKEFILE = """\
JOBS := a b c d e f
all: $(JOBS)
$(JOBS):
\t@s=$$(date +%s.%N); sleep 0.6; e=$$(date +%s.%N); echo "$$s $$e" > $@.t
install:
\tmkdir -p $(DESTDIR)/usr/share/t && cat *.t > $(DESTDIR)/usr/share/t/$(NAME)
"""


def add_sleeper(p: Project, name: str) -> None:
    digest = make_tarball(p.dist / f"{name}.tar.gz", name, {"Makefile": MAKEFILE})
    (p.packages / f"{name}.toml").write_text(
        f'name = "{name}"\nversion = "1"\nsummary = "s"\nlicense = "MIT"\nhomepage = "https://example.org"\n'
        f'[[sources]]\nurl = "{p.url}/{name}.tar.gz"\nsha256 = "{digest}"\n'
        'unsigned = "a test file: no upstream signature"\n'
        f'[build]\nsystem = "make"\nmake_args = ["NAME={name}"]\n[depends]\ntoolchain = false\n'
    )


def max_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_concurrent_packages_share_the_job_budget(project: Project, jobs: int) -> None:
    for n in ("s1", "s2", "s3"):
        add_sleeper(project, n)
    res = project.hadron("build", "--json", f"-j{jobs}", check=True)
    intervals: list[tuple[float, float]] = []
    for info in json.loads(res.stdout)["packages"].values():
        out = Path(info["output"])
        for line in next((out / "runtime/usr/share/t").iterdir()).read_text().split("\n"):
            if line.strip():
                s, e = line.split()
                intervals.append((float(s), float(e)))
    assert len(intervals) == 18
    peak = max_concurrency(intervals)
    assert peak <= jobs, f"{peak} jobs ran at once with -j{jobs}"
    assert peak == jobs, f"only {peak} jobs ran at once with -j{jobs}: the budget was not used"


def test_jobserver_tokens() -> None:
    js = JobServer(3)
    first = js.acquire_slot()
    assert first == b""  # the implicit slot
    second, third = js.acquire_slot(), js.acquire_slot()
    assert second and third and js.acquire_slot() is None
    assert js.grab(5) == []
    js.release_slot(third)  # type: ignore[arg-type]
    assert js.grab(5) == [b"+"]
    js.release([b"+"])
    js.release_slot(first)
    assert js.acquire_slot() == b""
    assert "--jobserver-auth=" in js.makeflags()
    js.close()
