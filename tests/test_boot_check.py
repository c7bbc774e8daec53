"""The boot-check unit: its shell script parses, and what it reports is read back from a console."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from hadron.boot import qemu


def exec_start_script() -> str:
    """The ExecStart= shell script as systemd passes it to /bin/sh: continuation lines joined, $$ -> $."""
    text = qemu.CHECK_UNIT.replace("\\\n", " ")
    m = re.search(r"^ExecStart=/bin/sh -c '(.*)'$", text, re.M)
    assert m, "no ExecStart=/bin/sh -c '...' line"
    return m.group(1).replace("$$", "$")


def test_check_script_is_valid_shell() -> None:
    res = subprocess.run(["sh", "-n", "-c", exec_start_script()], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_add_check_unit_enables_it_and_breakdown_flag(tmp_path: Path) -> None:
    qemu.add_check_unit(tmp_path)
    link = tmp_path / "etc/systemd/system/multi-user.target.wants" / qemu.CHECK_NAME
    assert link.is_symlink() and (link.parent / link.readlink()).resolve().read_text() == qemu.CHECK_UNIT
    assert not (tmp_path / qemu.BREAKDOWN_FLAG).exists()
    qemu.add_check_unit(tmp_path, breakdown=True)
    assert (tmp_path / qemu.BREAKDOWN_FLAG).exists()


def test_console_reports_are_parsed() -> None:
    console = "\n".join([
        "[   20.100000] HADRON-CHECK state=degraded",
        "[   20.200000] HADRON-FAILED kmod-static-nodes.service loaded failed failed Create List of Static Nodes",
        "[   20.300000] HADRON-TIME Startup finished in 2.3s (kernel) + 17.1s (userspace) = 19.4s",
        "[   20.400000] HADRON-CHAIN graphical.target @17.0s",
        "[   20.500000] HADRON-CHAIN └─multi-user.target @16.9s",
        "[   20.600000] HADRON-CPU cpu  1228 0 1314 162 13 0 2 0 0 0",
        "[   20.700000] HADRON-CHECK-END",
    ])
    r = qemu.BootResult("degraded", ["kmod-static-nodes.service"], 20.1, 25.0, console)
    assert not r.ok
    assert r.reported("TIME") == ["Startup finished in 2.3s (kernel) + 17.1s (userspace) = 19.4s"]
    assert r.reported("CHAIN") == ["graphical.target @17.0s", "└─multi-user.target @16.9s"]
    assert r.reported("CPU") == ["cpu  1228 0 1314 162 13 0 2 0 0 0"]
    assert r.reported("BLAME") == []


def test_probe_is_installed_executable_and_run_by_the_check(tmp_path: Path) -> None:
    qemu.add_check_unit(tmp_path, probe="#!/bin/sh\necho hello\n")
    probe = tmp_path / qemu.PROBE
    assert probe.read_text() == "#!/bin/sh\necho hello\n" and probe.stat().st_mode & 0o111
    assert f"/{qemu.PROBE} 2>&1 | say PROBE" in exec_start_script()
