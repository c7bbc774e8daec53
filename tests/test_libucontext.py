"""The project-owned libucontext (distro/packages/libucontext): build it with the host compiler,
run its own test programs, and check what `make install` lays out.

On a glibc host the C library has its own ucontext functions; the test programs call the
`libucontext_`-prefixed names and check that the standard names resolve to the library, so
they exercise this implementation either way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hadron.engine.recipe import CustomBuild, load_recipes

PACKAGES = Path(__file__).resolve().parents[1] / "distro" / "packages"
SRC = PACKAGES / "libucontext" / "src"
FUNCTIONS = ("getcontext", "setcontext", "makecontext", "swapcontext")

needs_toolchain = pytest.mark.skipif(
    shutil.which("cc") is None or shutil.which("make") is None, reason="needs a host `cc` and `make`"
)


def make(build: Path, *args: str, src: Path = SRC) -> subprocess.CompletedProcess[str]:
    """Run the component's Makefile out of tree in `build`, as the recipe does."""
    build.mkdir(parents=True, exist_ok=True)
    # Keep an outer make's job server and flags out; build with the host compiler.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env["CC"] = "cc"
    return subprocess.run(
        ["make", "-f", str(src / "Makefile"), f"SRCDIR={src}", "-j2", *args],
        cwd=build, env=env, capture_output=True, text=True, timeout=300,
    )


def output(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


def expected_runs(src: Path) -> set[str]:
    """Each tests/test_*.c runs twice: linked with the static and with the shared library."""
    names = [p.stem for p in (src / "tests").glob("test_*.c")]
    return {f"{n}-{kind}" for n in names for kind in ("static", "shared")}


def test_recipe_is_valid() -> None:
    r = load_recipes([PACKAGES])["libucontext"]
    assert r.folder == PACKAGES / "libucontext"
    assert r.recipe.sources == []
    assert r.recipe.license == "Apache-2.0"
    assert r.recipe.check is not None and "check" in r.recipe.check.command
    assert isinstance(r.recipe.build, CustomBuild)
    assert "/recipe/src/Makefile" in r.recipe.build.install


@needs_toolchain
def test_check_passes(tmp_path: Path) -> None:
    res = make(tmp_path, "check")
    assert res.returncode == 0, output(res)
    passed = set(re.findall(r"^PASS: (\S+)$", res.stdout, re.MULTILINE))
    assert len(expected_runs(SRC)) >= 8
    assert passed == expected_runs(SRC), output(res)
    assert "FAIL" not in res.stdout


@needs_toolchain
def test_check_fails_when_a_test_fails(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    (src / "tests" / "test_zz_broken.c").write_text("int main(void)\n{\n\treturn 3;\n}\n")
    res = make(tmp_path / "build", "check", src=src)
    assert res.returncode != 0, output(res)
    assert "FAIL: test_zz_broken-static" in res.stdout
    assert "PASS: test_fiber-static" in res.stdout  # the others still ran


@needs_toolchain
def test_install_layout(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    res = make(tmp_path / "build", "install", f"DESTDIR={dest}")
    assert res.returncode == 0, output(res)
    lib = dest / "usr" / "lib"
    assert (lib / "libucontext.so.1").is_file()
    assert (lib / "libucontext.so").is_symlink()
    assert os.readlink(lib / "libucontext.so") == "libucontext.so.1"
    assert (lib / "libucontext.a").is_file()
    assert (dest / "usr" / "include" / "libucontext" / "libucontext.h").is_file()
    pc = (lib / "pkgconfig" / "libucontext.pc").read_text()
    assert "prefix=/usr\n" in pc
    assert "Libs: -L${libdir} -lucontext\n" in pc
    assert "Version: 1.0.0\n" in pc

    if shutil.which("readelf"):
        dyn = subprocess.run(
            ["readelf", "-dW", str(lib / "libucontext.so.1")], capture_output=True, text=True, check=True
        ).stdout
        assert "Library soname: [libucontext.so.1]" in dyn
    if shutil.which("nm"):
        syms = subprocess.run(
            ["nm", "-D", "--defined-only", str(lib / "libucontext.so.1")],
            capture_output=True, text=True, check=True,
        ).stdout
        exported = {line.split()[-1] for line in syms.splitlines() if " T " in line}
        assert exported == {*FUNCTIONS, *(f"libucontext_{f}" for f in FUNCTIONS)}
