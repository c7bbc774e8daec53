"""CPU utilization of a cold synthetic graph build (goal: cores >= 90 % busy while runnable work exists).

Reports the whole machine's busy share sampled from /proc/stat every 100 ms, so it is meaningful on an
otherwise idle machine only (check the load average first). The build's own rusage cannot be used:
the sandboxed processes are reaped inside bubblewrap's PID namespace and never reach hadron's
children accounting."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthgraph import synthetic_project


def cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    with tempfile.TemporaryDirectory() as tmp, \
            synthetic_project(Path(tmp) / "proj", n, work=150, units=4) as (proj, _deps):
        env = dict(os.environ, HADRON_CACHE=str(Path(tmp) / "cache"), HADRON_MIRRORS="")
        samples: list[float] = []
        load_before = Path("/proc/loadavg").read_text().split()[0]
        t0 = time.monotonic()
        p = subprocess.Popen([sys.executable, "-m", "hadron", "build"], cwd=proj, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        prev = cpu_times()
        status = None
        while status is None:
            time.sleep(0.1)
            pid, st, _rusage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                status = st
            cur = cpu_times()
            busy, total = cur[0] - prev[0], cur[1] - prev[1]
            if total:
                samples.append(busy / total)
            prev = cur
        wall = time.monotonic() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("build failed")
    cores = os.cpu_count() or 1
    mean = sum(samples) / max(1, len(samples))
    # Ignore start-up (imports, planning) and the serial tail: the middle 80 % of samples.
    k = len(samples) // 10
    middle = samples[k: len(samples) - k] or samples
    print(f"packages:                 {n} (make-style, 4 C units each, CPU-heavy)")
    print(f"cores:                    {cores}")
    print(f"wall time:                {wall:.1f} s")
    print(f"load average before the run: {load_before}")
    print(f"mean CPU busy, whole run: {100 * mean:.0f} % (whole machine, /proc/stat)")
    print(f"mean CPU busy, middle 80% of the run: {100 * sum(middle) / len(middle):.0f} % (goal >= 90 %)")


if __name__ == "__main__":
    main()
