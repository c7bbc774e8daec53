"""ruff and mypy are part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_lint(tool: str) -> None:
    if tool == "ruff":
        cmd = [sys.executable, "-m", "ruff", "check", "src", "tests", "bench"]
    else:
        cmd = [sys.executable, "-m", "mypy"]
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: pip install -e '.[test]'")
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
