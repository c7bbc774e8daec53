"""Boot an assembled image in QEMU: direct kernel boot, root filesystem on a virtio disk.

TCG only (nested KVM is not dependable on build machines), one vCPU, serial console on the
terminal. ``check=True`` adds a one-shot unit to a copy of the disk that reports the system state
and failed units once multi-user.target is reached, then powers off.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from hadron.errors import HadronError

CHECK_UNIT = """\
[Unit]
Description=Hadron boot check: report the system state on the console, then power off
After=multi-user.target

[Service]
# Not a oneshot: `is-system-running --wait` waits for the boot transaction, which would include
# this unit's own start job.
Type=simple
# Written to the kernel log so that it reaches the serial console whatever the getty does to ttyS0.
# ($$ is a literal $ for the shell: systemd expands $NAME itself.)
ExecStart=/bin/sh -c 'state=$$(systemctl is-system-running --wait); echo "<4>HADRON-CHECK state=$$state" > /dev/kmsg; \\
systemctl list-units --failed --no-legend --plain --no-pager | while read -r unit rest; do \\
echo "<4>HADRON-FAILED $$unit $$rest" > /dev/kmsg; done; echo "<4>HADRON-CHECK-END" > /dev/kmsg; \\
systemctl poweroff --no-block'

[Install]
WantedBy=multi-user.target
"""
CHECK_NAME = "hadron-boot-check.service"


@dataclass
class BootResult:
    state: str | None
    failed: list[str] = field(default_factory=list)
    seconds_to_check: float | None = None
    seconds_total: float = 0.0
    console: str = ""

    @property
    def ok(self) -> bool:
        return self.state == "running" and not self.failed


def require(tool: str, package: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        raise HadronError(f"{tool} is not installed", hint=f"apt-get install {package}")
    return exe


def make_disk(rootfs: Path, disk: Path, *, check: bool = False, label: str = "hadron-root") -> None:
    """An ext4 filesystem image of ``rootfs`` (plus the check unit if asked)."""
    mkfs = require("mkfs.ext4", "e2fsprogs")
    src = rootfs
    tmp: Path | None = None
    if check:
        tmp = Path(tempfile.mkdtemp(prefix="hadron-disk-", dir=disk.parent))
        src = tmp / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(src)], check=True)
        unit_dir = src / "etc/systemd/system"
        (unit_dir / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
        (unit_dir / CHECK_NAME).write_text(CHECK_UNIT)
        link = unit_dir / "multi-user.target.wants" / CHECK_NAME
        if not link.is_symlink():
            link.symlink_to(f"../{CHECK_NAME}")
    try:
        used = sum((Path(d) / f).lstat().st_size for d, _, fs in os.walk(src) for f in fs)
        size_mb = max(256, int(used * 1.5 / 2**20) + 128)
        if disk.exists():
            disk.unlink()
        res = subprocess.run(
            [mkfs, "-q", "-F", "-L", label, "-d", str(src), "-E", "root_owner=0:0", "-T", "default",
             str(disk), f"{size_mb}M"],
            capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise HadronError(f"mkfs.ext4 failed: {res.stderr.strip()}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def qemu_argv(kernel: Path, disk: Path, *, memory_mb: int = 1024, append: str = "") -> list[str]:
    qemu = require("qemu-system-x86_64", "qemu-system-x86")
    cmdline = f"console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 {append}".strip()
    return [
        qemu, "-accel", "tcg", "-smp", "1", "-m", str(memory_mb), "-no-reboot",
        "-kernel", str(kernel), "-append", cmdline,
        "-drive", f"file={disk},format=raw,if=virtio",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
    ]


def boot(kernel: Path, disk: Path, *, timeout: float = 300, echo: bool = True, append: str = "") -> BootResult:
    """Boot and read the console until QEMU exits (the check unit powers off) or ``timeout``."""
    argv = [*qemu_argv(kernel, disk, append=append), "-serial", "stdio", "-monitor", "none", "-display", "none"]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    buf = b""
    seen_check: float | None = None
    try:
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                break
            r, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                buf += chunk
                if seen_check is None and b"HADRON-CHECK state=" in buf:
                    seen_check = time.monotonic() - t0
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = buf.decode(errors="replace").replace("\r", "")
    m = re.search(r"HADRON-CHECK state=(\S*)", text)
    failed = re.findall(r"HADRON-FAILED (\S+)", text)
    return BootResult(m.group(1) if m else None, failed, seen_check, time.monotonic() - t0, text)


def interactive(kernel: Path, disk: Path, append: str = "") -> int:
    """Boot with the serial console attached to this terminal (Ctrl-A X quits)."""
    return subprocess.call([*qemu_argv(kernel, disk, append=append), "-nographic"])
