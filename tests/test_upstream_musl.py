"""One real upstream package: musl, fetched through the Debian mirror provider (the host's apt
configuration names the archive) and built in the sandbox with the build environment's compiler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hadron.engine.mirrors import apt_debian_uris

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.skipif(not apt_debian_uris(), reason="the host's apt configuration names no Debian archive"),
]


def test_musl_from_debian_archive(tmp_path: Path) -> None:
    env = dict(os.environ, HADRON_CACHE=str(tmp_path / "cache"))
    env.pop("HADRON_MIRRORS", None)
    cmd = [sys.executable, "-m", "hadron", "build", "musl", "--toolchain", "native", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)["packages"]["musl"]
    out = Path(info["output"])
    manifest = json.loads((out / "manifest.json").read_text())
    src = manifest["sources"][0]
    assert src["fetched_from"].endswith("/pool/main/m/musl/musl_1.2.6.orig.tar.gz")
    assert src["sha256"] == "d585fd3b613c66151fc3249e8ed44f77020cb5e6c1e635a616d3f9f82460512a"
    libc = out / "runtime/usr/lib/libc.so"
    assert libc.is_file() and (out / "dev/usr/include/stdio.h").is_file()
    assert (out / "dev/usr/lib/libc.a").is_file()
    # musl's libc.so is also its dynamic loader; run as a program it prints its version.
    ver = subprocess.run([str(libc)], capture_output=True, text=True)
    assert "Version 1.2.6" in ver.stderr
    # A second build does nothing.
    res2 = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert json.loads(res2.stdout)["packages"]["musl"]["status"] == "cached"
