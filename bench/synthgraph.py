"""A synthetic distribution for benchmarks: N make-style C packages in a layered DAG."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synth import http_server, write_package


@contextmanager
def synthetic_project(root: Path, n: int, *, work: int = 0, units: int = 1, seed: int = 7
                      ) -> Iterator[tuple[Path, dict[str, list[str]]]]:
    """Create ``n`` packages; each depends on up to 3 earlier ones. Yields (project, deps)."""
    rng = random.Random(seed)
    pkgs = root / "distro" / "packages"
    dist = root / "dist"
    pkgs.mkdir(parents=True, exist_ok=True)
    dist.mkdir(exist_ok=True)
    deps: dict[str, list[str]] = {}
    ancestors: dict[str, set[str]] = {}
    with http_server(dist) as (url, _hits):
        for i in range(n):
            name = f"p{i:03d}"
            earlier = list(deps)
            d = sorted(rng.sample(earlier, k=min(len(earlier), rng.randint(0, 3)))) if earlier else []
            deps[name] = d
            link = sorted(set(d).union(*(ancestors[x] for x in d)))
            ancestors[name] = set(link)
            write_package(pkgs, dist, url, name, "make", d, work=work, units=units, link=link)
        yield root, deps


def hadron(project: Path, cache: Path, *args: str) -> tuple[float, dict[str, object]]:
    env = dict(os.environ, HADRON_CACHE=str(cache), HADRON_MIRRORS="")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "hadron", *args, "--json"], cwd=project, env=env,
                         capture_output=True, text=True)
    dt = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"hadron {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}")
    return dt, json.loads(res.stdout)


def reverse_closure(deps: dict[str, list[str]], leaf: str) -> set[str]:
    out = {leaf}
    changed = True
    while changed:
        changed = False
        for n, ds in deps.items():
            if n not in out and any(d in out for d in ds):
                out.add(n)
                changed = True
    return out
