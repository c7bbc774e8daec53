"""Fault injection for crash-consistency tests: ``HADRON_FAULT=<point>`` makes the process kill
itself with SIGKILL when it reaches that point. Unset (always, outside tests) it does nothing."""

from __future__ import annotations

import os
import signal

POINTS = ("after-unpack", "after-build", "after-split", "after-manifest", "after-rename")


def point(name: str) -> None:
    if os.environ.get("HADRON_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
