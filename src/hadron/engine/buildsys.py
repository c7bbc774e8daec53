"""Build-system helpers: turn a recipe's declarative ``[build]`` table into shell steps.

Every helper yields the same phases — configure, build, install, and check when the recipe has
one — each run in its own fresh sandbox. Inside it: sources at ``/src`` (read-only), the recipe
folder at ``/recipe``, the dependencies' outputs merged at ``/sysroot``, the build directory
``/build`` (the working directory) and ``$DESTDIR`` (``/destdir``).
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass

from hadron.engine.recipe import (
    AutotoolsBuild,
    CMakeBuild,
    CustomBuild,
    KbuildBuild,
    MakeBuild,
    MesonBuild,
    Recipe,
)

SRC = "/src"
TREE = "/build/tree"  # writable copy of the sources for in-tree builds
BUILD_DIR = "/build/_b"


@dataclass(frozen=True)
class Phase:
    name: str
    script: str
    uses_jobserver: bool  # make-driven: share CPU through the GNU make jobserver


def q(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def _opt(v: str | bool | int) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def srcdir(recipe: Recipe) -> str:
    b = recipe.build
    in_tree = b.in_tree if b.in_tree is not None else isinstance(b, MakeBuild)
    base = TREE if in_tree else SRC
    return f"{base}/{b.subdir}".rstrip("/") if b.subdir else base


def _prelude(recipe: Recipe) -> str:
    b = recipe.build
    in_tree = b.in_tree if b.in_tree is not None else isinstance(b, MakeBuild)
    lines = ["set -eu", 'mkdir -p "$HOME"', f"export SRCDIR={shlex.quote(srcdir(recipe))}"]
    if in_tree:
        lines.append(f'if [ ! -d {TREE} ]; then cp -a {SRC} {TREE}; fi')
    return "\n".join(lines) + "\n"


def phases(recipe: Recipe, *, check: bool = True) -> list[Phase]:
    b = recipe.build
    pre = _prelude(recipe)
    out: list[Phase] = []

    def add(name: str, body: str, jobserver: bool = True) -> None:
        out.append(Phase(name, pre + body.strip() + "\n", jobserver))

    if isinstance(b, AutotoolsBuild):
        if b.bootstrap:
            add("bootstrap", f'cd "$SRCDIR"\n{b.bootstrap}')
        add("configure", f'"$SRCDIR/configure" --prefix=/usr $HADRON_CONFIGURE_HOST {q(b.configure_args)}')
        add("build", f"make {q(b.make_args)}")
        add("install", f'make DESTDIR="$DESTDIR" {q(b.install_args)} {shlex.quote(b.install_target)}')
    elif isinstance(b, MesonBuild):
        opts = q([f"-D{k}={_opt(v)}" for k, v in sorted(b.options.items())])
        add(
            "configure",
            f'meson setup {BUILD_DIR} "$SRCDIR" --prefix=/usr --libdir=lib --buildtype={b.buildtype} '
            f"--wrap-mode=nodownload $HADRON_MESON_ARGS {opts}",
            jobserver=False,
        )
        add("build", f'ninja -C {BUILD_DIR} -j "$JOBS"', jobserver=False)
        add("install", f'DESTDIR="$DESTDIR" meson install -C {BUILD_DIR} --no-rebuild --quiet', jobserver=False)
    elif isinstance(b, CMakeBuild):
        opts = q([f"-D{k}={_opt(v)}" for k, v in sorted(b.options.items())])
        add(
            "configure",
            f'cmake -S "$SRCDIR" -B {BUILD_DIR} -G Ninja -DCMAKE_INSTALL_PREFIX=/usr '
            f"-DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_BUILD_TYPE={b.build_type} $HADRON_CMAKE_ARGS {opts}",
            jobserver=False,
        )
        add("build", f'cmake --build {BUILD_DIR} -j "$JOBS"', jobserver=False)
        add("install", f'DESTDIR="$DESTDIR" cmake --install {BUILD_DIR}', jobserver=False)
    elif isinstance(b, MakeBuild):
        add("build", f'cd "$SRCDIR"\nmake {q(b.make_args)}')
        add(
            "install",
            f'cd "$SRCDIR"\nmake DESTDIR="$DESTDIR" PREFIX=/usr {q(b.make_args)} {q(b.install_args)} '
            f"{shlex.quote(b.install_target)}",
        )
    elif isinstance(b, KbuildBuild):
        frags = " ".join(shlex.quote(f"/recipe/{f}") for f in b.fragments)
        kmake = f'make -C "$SRCDIR" O={BUILD_DIR} {q(b.make_args)}'
        configure = f"{kmake} {q(b.base_config.split())}"
        if frags:
            configure += (
                f'\n"$SRCDIR/scripts/kconfig/merge_config.sh" -m -O {BUILD_DIR} {BUILD_DIR}/.config {frags}'
                f"\n{kmake} olddefconfig"
            )
        add("configure", configure)
        add("build", f"{kmake} {q(b.targets)}")
        add("install", b.install or 'echo "kbuild recipe has no install step" >&2; exit 1')
    elif isinstance(b, CustomBuild):
        if b.configure:
            add("configure", b.configure)
        if b.build:
            add("build", b.build)
        add("install", b.install)
    if check and recipe.check and recipe.check.enabled:
        cwd = 'cd "$SRCDIR"\n' if srcdir(recipe).startswith(TREE) else ""
        add("check", cwd + recipe.check.command, jobserver=not isinstance(b, MesonBuild | CMakeBuild))
    return out


def steps_digest(recipe: Recipe) -> str:
    """The shell steps the helper generates for ``recipe`` (the check phase excluded: it does not
    shape the output). Part of the cache key, so a helper change rebuilds what it changes."""
    h = hashlib.sha256()
    for p in phases(recipe, check=False):
        h.update(f"{p.name}\0{p.uses_jobserver}\0{p.script}\0".encode())
    return h.hexdigest()


def kbuild_fragment_problems(config_text: str, fragments: dict[str, str]) -> list[str]:
    """Symbols a fragment sets that did not survive ``olddefconfig`` (missing dependencies)."""
    final: dict[str, str] = {}
    for line in config_text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, v = line.split("=", 1)
            final[k] = v
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            final[line[2:].split(" ", 1)[0]] = "n"
    problems = []
    for fname, text in fragments.items():
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line.startswith("CONFIG_") and "=" in line:
                k, v = line.split("=", 1)
            elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                k, v = line[2:].split(" ", 1)[0], "n"
            else:
                continue
            got = final.get(k, "n")
            if got != v:
                problems.append(f"{fname}:{n}: {k}={v} requested, final .config has {k}={got}")
    return problems
