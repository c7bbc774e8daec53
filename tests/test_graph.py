from __future__ import annotations

from pathlib import Path

import pytest

from hadron.engine.graph import CycleError, Graph
from hadron.engine.recipe import load_recipes


def recipe(name: str, build: list[str], run: list[str] | None = None) -> str:
    b = ", ".join(f'"{d}"' for d in build)
    r = ", ".join(f'"{d}"' for d in run or [])
    return (
        f'name = "{name}"\nversion = "1"\nsummary = "s"\nlicense = "MIT"\nhomepage = "https://example.org"\n'
        f'[build]\nsystem = "custom"\ninstall = "true"\n[depends]\nbuild = [{b}]\nrun = [{r}]\n'
    )


def graph(tmp_path: Path, spec: dict[str, list[str]], run: dict[str, list[str]] | None = None,
          toolchain: tuple[str, ...] = ()) -> Graph:
    for n, deps in spec.items():
        (tmp_path / f"{n}.toml").write_text(recipe(n, deps, (run or {}).get(n)))
    return Graph(load_recipes([tmp_path]), toolchain)


def test_closure_orders_dependencies_first(tmp_path: Path) -> None:
    g = graph(tmp_path, {"a": [], "b": ["a"], "c": ["b", "a"], "d": []})
    order = g.closure(["c"])
    assert order == ["a", "b", "c"]
    assert g.transitive_build_inputs("c") == ["a", "b"]


def test_cycle_is_reported_as_the_cycle(tmp_path: Path) -> None:
    g = graph(tmp_path, {"a": ["c"], "b": ["a"], "c": ["b"], "x": ["a"]})
    with pytest.raises(CycleError) as ei:
        g.closure(["x"])
    cyc = ei.value.cycle
    assert cyc[0] == cyc[-1] and set(cyc) == {"a", "b", "c"} and len(cyc) == 4
    assert "dependency cycle: " in str(ei.value)


def test_run_dependency_cycles_are_allowed_and_staged(tmp_path: Path) -> None:
    g = graph(tmp_path, {"sd": [], "dbus": [], "app": ["dbus"]}, run={"sd": ["dbus"], "dbus": ["sd"]})
    assert set(g.closure(["app"])) == {"sd", "dbus", "app"}
    assert g.transitive_build_inputs("app") == ["dbus", "sd"]


def test_toolchain_packages_are_implicit_build_deps(tmp_path: Path) -> None:
    g = graph(tmp_path, {"tc": [], "a": []}, toolchain=("tc",))
    assert g.build_deps("a") == ["tc"]
    assert g.build_deps("tc") == []


def test_tree_and_dot(tmp_path: Path) -> None:
    g = graph(tmp_path, {"a": [], "b": ["a"], "c": ["b", "a"]})
    tree = g.tree("c")
    assert tree.splitlines()[0] == "c 1" and "├── b 1" in tree and "└── a 1" in tree
    dot = g.dot(["c"])
    assert '"c" -> "b";' in dot and dot.startswith("digraph")


def test_sysroot_holds_build_deps_and_their_run_closure_only(tmp_path: Path) -> None:
    # app builds against lib; lib needs z at run time and was built with gen (a build-only tool).
    g = graph(tmp_path, {"gen": [], "z": [], "lib": ["gen", "z"], "app": ["lib"]}, run={"lib": ["z"]})
    assert g.transitive_build_inputs("app") == ["lib", "z"]
    assert g.transitive_build_inputs("lib") == ["gen", "z"]
