"""The BuildKit executor's parts that need no daemon: worker addresses and the generated steps."""

from __future__ import annotations

from pathlib import Path

import pytest

from hadron.engine import buildkit
from hadron.engine.executor import BuildRequest
from hadron.engine.recipe import load_recipes
from hadron.engine.toolchain import load_toolchain
from hadron.errors import HadronError

ROOT = Path(__file__).resolve().parents[1]


def test_worker_addresses() -> None:
    assert buildkit.parse_workers("buildkit") == [buildkit.DEFAULT_WORKER]
    assert buildkit.parse_workers("buildkit=unix:///a.sock, tcp://10.0.0.2:2375") == [
        "unix:///a.sock", "tcp://10.0.0.2:2375"]
    for bad in ("buildkit=", "buildkit=/a.sock", "bazel=unix:///a.sock"):
        with pytest.raises(HadronError):
            buildkit.parse_workers(bad)


def test_steps_run_every_phase_with_the_local_environment(tmp_path: Path) -> None:
    lr = load_recipes([ROOT / "distro" / "packages"])["zlib"]
    req = BuildRequest(recipe=lr, key="0" * 64, sources=[], inputs={}, env_identity="buildenv:sha256:" + "1" * 64,
                       toolchain=load_toolchain(ROOT, "host"), source_date_epoch=1735689600)
    buildkit.BuildKitExecutor._write_steps(req, tmp_path / "steps", kbuild=False)
    run = (tmp_path / "steps" / "run.sh").read_text()
    assert "export SOURCE_DATE_EPOCH=1735689600" in run
    assert "export DESTDIR=/destdir" in run and "export HADRON_PACKAGE=zlib" in run
    scripts = sorted(p.name for p in (tmp_path / "steps").iterdir() if p.name != "run.sh")
    assert any("configure" in s for s in scripts) and any("install" in s for s in scripts)
    assert run.index("configure") < run.index("install")
