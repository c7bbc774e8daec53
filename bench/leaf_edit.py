"""Packages rebuilt after editing one leaf recipe, versus the leaf plus its reverse dependencies."""

from __future__ import annotations

import tempfile
from pathlib import Path

from synthgraph import hadron, reverse_closure, synthetic_project


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, synthetic_project(Path(tmp) / "proj", 100) as (proj, deps):
        cache = Path(tmp) / "cache"
        hadron(proj, cache, "build")
        leaf = "p010"
        expected = reverse_closure(deps, leaf)
        # 1. An edit that changes the output: every reverse dependency must rebuild.
        recipe = proj / "distro" / "packages" / f"{leaf}.toml"
        text = recipe.read_text()
        recipe.write_text(text.replace('make_args = ["SYSROOT=/sysroot"]',
                                       'make_args = ["SYSROOT=/sysroot", "CFLAGS=-O1"]'))
        dt, res = hadron(proj, cache, "build")
        pk = res["packages"]
        assert isinstance(pk, dict)
        rebuilt = {n for n, p in pk.items() if p["status"] == "built"}
        print(f"leaf edited:                     {leaf} (reverse dependencies: {len(expected) - 1})")
        print(f"output-changing edit, rebuilt:   {len(rebuilt)} packages in {dt:.1f} s "
              f"(expected {len(expected)}; exact match: {rebuilt == expected})")
        # 2. An edit that leaves the output byte-identical: early cutoff rebuilds only the leaf.
        recipe.write_text(recipe.read_text().replace('summary = "synthetic make package"', 'summary = "edited"'))
        dt, res = hadron(proj, cache, "build")
        pk = res["packages"]
        assert isinstance(pk, dict)
        rebuilt = {n for n, p in pk.items() if p["status"] == "built"}
        print(f"output-neutral edit, rebuilt:    {len(rebuilt)} package(s) in {dt:.1f} s ({sorted(rebuilt)}; "
              "early cutoff)")


if __name__ == "__main__":
    main()
