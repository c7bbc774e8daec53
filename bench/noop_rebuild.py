"""No-op rebuild of a 100-recipe synthetic graph (goal: < 1 s)."""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from synthgraph import hadron, synthetic_project


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with synthetic_project(Path(tmp) / "proj", 100) as (proj, _deps):
            cache = Path(tmp) / "cache"
            cold, _ = hadron(proj, cache, "build")
            times = []
            for _ in range(5):
                dt, res = hadron(proj, cache, "build")
                pk = res["packages"]
                assert isinstance(pk, dict) and all(p["status"] == "cached" for p in pk.values())
                times.append(dt)
        print("packages:             100")
        print(f"cold build:           {cold:.1f} s")
        print(f"no-op rebuild median: {statistics.median(times):.3f} s (min {min(times):.3f}, max {max(times):.3f}; "
              "whole `hadron build` process, 5 runs)")
        print(f"goal < 1 s:           {'met' if statistics.median(times) < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
