"""The dependency graph of recipes: closure, topological order, cycles, rendering."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from hadron.engine.recipe import LoadedRecipe
from hadron.errors import HadronError


class CycleError(HadronError):
    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        super().__init__(
            "dependency cycle: " + " -> ".join(cycle),
            hint="break the cycle by removing one of these build dependencies",
        )


@dataclass(frozen=True)
class Graph:
    recipes: dict[str, LoadedRecipe]
    # Toolchain packages: implicit build dependencies of recipes with `depends.toolchain = true`.
    toolchain: tuple[str, ...] = ()

    def build_deps(self, name: str) -> list[str]:
        r = self.recipes[name].recipe
        implicit = [t for t in self.toolchain if r.depends.toolchain and t != name]
        return [*implicit, *(d for d in r.depends.build if d not in implicit)]

    def run_deps(self, name: str) -> list[str]:
        return list(self.recipes[name].recipe.depends.run)

    def check_targets(self, targets: Iterable[str]) -> list[str]:
        names = list(targets)
        unknown = [t for t in names if t not in self.recipes]
        if unknown:
            raise HadronError(
                "unknown package(s): " + ", ".join(unknown),
                hint="`hadron graph` lists every package; --recipes DIR adds recipe directories",
            )
        return names

    def closure(self, targets: Iterable[str], *, include_run: bool = True) -> list[str]:
        """Targets and everything they need, in dependency order (dependencies first)."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 = visiting, 2 = done
        stack: list[str] = []

        def visit(n: str) -> None:
            st = state.get(n)
            if st == 2:
                return
            if st == 1:
                raise CycleError([*stack[stack.index(n) :], n])
            state[n] = 1
            stack.append(n)
            for d in self.build_deps(n):
                visit(d)
            stack.pop()
            state[n] = 2
            order.append(n)
            if include_run:
                for d in self.run_deps(n):
                    if state.get(d) != 1:
                        visit(d)

        for t in self.check_targets(targets):
            visit(t)
        return order

    def transitive_build_inputs(self, name: str) -> list[str]:
        """Packages whose outputs are staged into ``name``'s sysroot: its build dependencies and
        everything they need at run time (recursively). A dependency's own build dependencies are not
        staged: they were needed to make it, not to use it."""
        seen: list[str] = []
        todo = list(self.build_deps(name))
        while todo:
            d = todo.pop(0)
            if d not in seen and d != name:
                seen.append(d)
                todo += self.run_deps(d)
        return sorted(seen)

    def reverse_deps(self) -> dict[str, list[str]]:
        rev: dict[str, list[str]] = {n: [] for n in self.recipes}
        for n in self.recipes:
            for d in self.build_deps(n):
                rev[d].append(n)
        return rev

    def tree(self, target: str) -> str:
        lines: list[str] = []

        def walk(n: str, prefix: str, last: bool, seen: set[str], top: bool) -> None:
            r = self.recipes[n].recipe
            label = f"{n} {r.version}"
            if top:
                lines.append(label)
            else:
                lines.append(f"{prefix}{'└── ' if last else '├── '}{label}")
            if n in seen:
                if self.build_deps(n):
                    lines[-1] += " …"
                return
            seen = seen | {n}
            kids = self.build_deps(n)
            child_prefix = prefix if top else prefix + ("    " if last else "│   ")
            for i, k in enumerate(kids):
                walk(k, child_prefix, i == len(kids) - 1, seen, False)

        self.closure([target])  # raises on cycles
        walk(target, "", True, set(), True)
        return "\n".join(lines)

    def dot(self, targets: Iterable[str]) -> str:
        names = self.closure(targets)
        out = ["digraph hadron {", "  rankdir=LR;", '  node [shape=box, fontname="sans"];']
        for n in names:
            out.append(f'  "{n}" [label="{n}\\n{self.recipes[n].recipe.version}"];')
        for n in names:
            for d in self.build_deps(n):
                out.append(f'  "{n}" -> "{d}";')
            for d in self.run_deps(n):
                out.append(f'  "{n}" -> "{d}" [style=dashed];')
        out.append("}")
        return "\n".join(out)
