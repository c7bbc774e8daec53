"""Live progress on a terminal (rich), plain timestamped lines otherwise."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Reporter:
    def __init__(self, total: int, *, live: bool | None = None, quiet: bool = False) -> None:
        self.total = total
        self.quiet = quiet
        self.console = Console(stderr=True)
        self.live_mode = (sys.stderr.isatty() if live is None else live) and not quiet
        self.t0 = time.monotonic()
        self.running: dict[str, tuple[str, float]] = {}
        self.done = 0
        self._lock = threading.Lock()
        self._live: Live | None = None

    def __enter__(self) -> Reporter:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def _render(self) -> Table:
        t = Table.grid(padding=(0, 2))
        t.add_row(f"[bold]{self.done}/{self.total}[/] done", f"{time.monotonic() - self.t0:.0f}s")
        now = time.monotonic()
        for name, (phase, since) in sorted(self.running.items()):
            t.add_row(f"  [cyan]{name}[/]", f"{phase} {now - since:.0f}s")
        return t

    def _line(self, text: str) -> None:
        if self.quiet:
            return
        stamp = f"[{time.monotonic() - self.t0:7.1f}s]"
        if self._live is not None:
            self._live.console.print(f"{stamp} {text}", highlight=False, markup=False)
            self._live.update(self._render())
        else:
            print(f"{stamp} {text}", file=sys.stderr, flush=True)

    def phase(self, name: str, phase: str) -> None:
        with self._lock:
            self.running[name] = (phase, time.monotonic())
            if self._live is not None:
                self._live.update(self._render())
            else:
                self._line(f"{name}: {phase}")

    def note(self, name: str, text: str) -> None:
        with self._lock:
            self._line(f"{name}: {text}")

    def finished(self, name: str, status: str, detail: str = "") -> None:
        with self._lock:
            self.running.pop(name, None)
            self.done += 1
            self._line(f"{name}: {status}{' ' + detail if detail else ''}")
