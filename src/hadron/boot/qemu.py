"""Boot an image in QEMU: direct kernel boot with the root file system on a virtio disk, or a whole
disk image through firmware (SeaBIOS, OVMF, OVMF with Secure Boot enforced) with an optional TPM 2.0
emulated by swtpm.

TCG only (nested KVM is not dependable on build machines), one vCPU, serial console on the
terminal. ``check=True`` adds a unit to a copy of the root file system that reports the system
state, the failed units and (when there is a TPM) PCR 11 once multi-user.target is reached, then
powers off.
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

from hadron import runner
from hadron.errors import HadronError

CHECK_UNIT = """\
[Unit]
Description=Hadron boot check: report the system state on the console, then power off
After=multi-user.target

[Service]
# Not a oneshot: `is-system-running --wait` waits for the boot transaction, which would include
# this unit's own start job.
Type=simple
# Everything goes to the kernel log so that it reaches the serial console whatever the getty does
# to ttyS0. The state line comes first: its arrival is the boot's measured end. Then the failed
# units, `systemd-analyze time` where the system has it, PCR 11 where there is a TPM, and (when
# /etc/hadron-check-breakdown exists) systemd-analyze critical-chain and blame, the CPU time
# /proc/stat counts since boot (user nice system idle iowait irq softirq, in 1/100 s) and
# the CPU time of each running service's cgroup. Last, a probe script the caller may add
# (/etc/hadron-check.d/probe, e.g. the trusted path's unseal matrix) reports its lines as PROBE.
# ($$ is a literal $ for the shell: systemd expands $NAME itself.)
ExecStart=/bin/sh -c 'say() { while IFS= read -r line; do echo "<4>HADRON-$$1 $$line" > /dev/kmsg; done; }; \\
state=$$(systemctl is-system-running --wait); echo "<4>HADRON-CHECK state=$$state" > /dev/kmsg; \\
cpu=$$(head -n 1 /proc/stat); \\
systemctl list-units --failed --no-legend --plain --no-pager | say FAILED; \\
if command -v systemd-analyze >/dev/null; then systemd-analyze time | head -n 1 | say TIME; \\
if [ -e /etc/hadron-check-breakdown ]; then systemd-analyze critical-chain --no-pager | say CHAIN; \\
systemd-analyze blame --no-pager | head -n 30 | say BLAME; fi; fi; \\
if [ -e /etc/hadron-check-breakdown ]; then echo "$$cpu" | say CPU; \\
for f in /sys/fs/cgroup/init.scope/cpu.stat /sys/fs/cgroup/system.slice/*/cpu.stat; do \\
echo "$$(head -n 1 $$f) $${f#/sys/fs/cgroup/}"; done | say CGROUP; fi; \\
pcr=/sys/class/tpm/tpm0/pcr-sha256/11; \\
if [ -r $$pcr ]; then echo "<4>HADRON-PCR11 $$(cat $$pcr)" > /dev/kmsg; fi; \\
if [ -x /etc/hadron-check.d/probe ]; then /etc/hadron-check.d/probe 2>&1 | say PROBE; fi; \\
echo "<4>HADRON-CHECK-END" > /dev/kmsg; systemctl poweroff --no-block'

[Install]
WantedBy=multi-user.target
"""
BREAKDOWN_FLAG = "etc/hadron-check-breakdown"
PROBE = "etc/hadron-check.d/probe"
CHECK_NAME = "hadron-boot-check.service"

OVMF_DIR = Path("/usr/share/OVMF")
SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
# Host programs and firmware files a boot needs (rows of hadron.host's table).
HOST_TOOLS = ("qemu-system-x86_64", "cp")
FIRMWARE_FILES = {
    "bios": (str(SEABIOS),),
    "uefi": (str(OVMF_DIR / "OVMF_CODE_4M.fd"), str(OVMF_DIR / "OVMF_VARS_4M.fd")),
    "secure-boot": (str(OVMF_DIR / "OVMF_CODE_4M.secboot.fd"), str(OVMF_DIR / "OVMF_VARS_4M.fd"), "swtpm"),
}
# A direct kernel boot: QEMU and an ext4 root made from the image.
DIRECT_BOOT_NEEDS = (*HOST_TOOLS, "mkfs.ext4")


@dataclass
class BootResult:
    state: str | None
    failed: list[str] = field(default_factory=list)
    seconds_to_check: float | None = None
    seconds_total: float = 0.0
    console: str = ""
    pcr11: str | None = None  # hex, as the booted kernel read it from the TPM

    @property
    def ok(self) -> bool:
        return self.state == "running" and not self.failed

    def reported(self, tag: str) -> list[str]:
        """The lines the check unit reported under ``HADRON-<tag>`` (TIME, CHAIN, BLAME), in order."""
        return [m.rstrip() for m in re.findall(rf"HADRON-{tag} (.*)", self.console)]


def add_check_unit(root: Path, *, breakdown: bool = False, probe: str | None = None) -> None:
    """Install and enable the boot-check unit in a (copied) root file system tree; ``breakdown``
    makes it also report systemd-analyze critical-chain and blame; ``probe`` is a shell script it
    runs last, whose output it reports as PROBE lines."""
    if breakdown:
        (root / BREAKDOWN_FLAG).write_text("")
    if probe is not None:
        (root / PROBE).parent.mkdir(parents=True, exist_ok=True)
        (root / PROBE).write_text(probe)
        (root / PROBE).chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    (unit_dir / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (unit_dir / CHECK_NAME).write_text(CHECK_UNIT)
    link = unit_dir / "multi-user.target.wants" / CHECK_NAME
    if not link.is_symlink():
        link.symlink_to(f"../{CHECK_NAME}")


def copy_tree(src: Path, dest: Path) -> None:
    runner.run(["cp", "-a", "--reflink=auto", src, dest], what=f"copying {src}")


def make_disk(rootfs: Path, disk: Path, *, check: bool = False, label: str = "hadron-root") -> None:
    """An ext4 filesystem image of ``rootfs`` (plus the check unit if asked)."""
    from hadron.boot.disk import make_root_fs

    if not check:
        make_root_fs(rootfs, disk, label=label)
        return
    with tempfile.TemporaryDirectory(prefix="hadron-disk-", dir=disk.parent) as td:
        src = Path(td) / "root"
        copy_tree(rootfs, src)
        add_check_unit(src)
        make_root_fs(src, disk, label=label)


def _machine_argv(disk: Path, memory_mb: int) -> list[str]:
    """What every boot shares: TCG, one vCPU, the disk on virtio, a user-mode network with no way out."""
    qemu = runner.tool("qemu-system-x86_64")
    return [qemu, "-accel", "tcg", "-smp", "1", "-m", str(memory_mb), "-no-reboot",
            "-drive", f"file={disk},format=raw,if=virtio",
            "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0"]


def qemu_argv(kernel: Path, disk: Path, *, memory_mb: int = 1024, append: str = "") -> list[str]:
    cmdline = f"console=ttyS0 root=/dev/vda rootfstype=ext4 rw panic=-1 {append}".strip()
    return [*_machine_argv(disk, memory_mb), "-kernel", str(kernel), "-append", cmdline]


def boot(kernel: Path, disk: Path, *, timeout: float = 300, echo: bool = True, append: str = "") -> BootResult:
    """Boot and read the console until QEMU exits (the check unit powers off) or ``timeout``."""
    argv = [*qemu_argv(kernel, disk, append=append), "-serial", "stdio", "-monitor", "none", "-display", "none"]
    return run_console(argv, timeout=timeout, echo=echo)


FIRMWARES = ("bios", "uefi", "secure-boot")


def firmware_argv(disk: Path, firmware: str, workdir: Path, *, vars_file: Path | None = None,
                  tpm_socket: Path | None = None, memory_mb: int = 1024, extra_disks: tuple[Path, ...] = (),
                  reboot: bool = False) -> list[str]:
    """QEMU arguments booting the whole ``disk`` through ``firmware`` (see FIRMWARES).

    ``secure-boot`` runs OVMF's Secure Boot build (SMM, secure flash) with ``vars_file`` as its
    variable store, which must hold the enrolled keys (secureboot.enroll_ovmf_vars). ``extra_disks``
    are attached read-only after the boot disk (vdb, …); with ``reboot`` a reboot restarts the
    machine (firmware, boot loader) instead of ending the run."""
    argv = _machine_argv(disk, memory_mb)
    if reboot:
        argv.remove("-no-reboot")
    for extra in extra_disks:
        argv += ["-drive", f"file={extra},format=raw,if=virtio,readonly=on"]
    if firmware == "bios":
        argv[1:1] = ["-machine", "q35"]
    elif firmware in ("uefi", "secure-boot"):
        secure = firmware == "secure-boot"
        code = OVMF_DIR / ("OVMF_CODE_4M.secboot.fd" if secure else "OVMF_CODE_4M.fd")
        if not code.is_file():
            raise HadronError(f"{code} is missing", hint="apt-get install ovmf")
        if secure and vars_file is None:
            raise HadronError("Secure Boot needs a variable store with the keys enrolled")
        store = workdir / "OVMF_VARS.fd"
        shutil.copyfile(vars_file or OVMF_DIR / "OVMF_VARS_4M.fd", store)
        argv[1:1] = ["-machine", "q35,smm=on" if secure else "q35",
                     *(["-global", "driver=cfi.pflash01,property=secure,value=on"] if secure else []),
                     "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                     "-drive", f"if=pflash,format=raw,unit=1,file={store}"]
    else:
        raise HadronError(f"unknown firmware {firmware!r}", hint="one of: " + ", ".join(FIRMWARES))
    if tpm_socket is not None:
        argv += ["-chardev", f"socket,id=chrtpm,path={tpm_socket}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-crb,tpmdev=tpm0"]
    return argv


def start_swtpm(state: Path, sock: Path | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    """A TPM 2.0 emulator keeping its state in ``state`` (a later boot with the same directory has the
    same TPM: its seeds, keys and NV indexes); returns the process and its control socket."""
    swtpm = runner.tool("swtpm")
    state.mkdir(parents=True, exist_ok=True)
    sock = sock or state / "swtpm.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen([swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state}",
                             "--ctrl", f"type=unixio,path={sock}", "--flags", "startup-clear"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if sock.exists():
            return proc, sock
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise HadronError("swtpm did not start", hint=f"run `swtpm socket --tpm2 --tpmstate dir={state} ...` by hand")


def boot_disk(disk: Path, firmware: str, *, vars_file: Path | None = None, tpm: bool = False,
              tpm_state: Path | None = None, timeout: float = 600, echo: bool = True,
              stop_on: tuple[bytes, ...] = (), extra_disks: tuple[Path, ...] = (), reboot: bool = False,
              keep_vars: bool = False) -> BootResult:
    """Boot a whole disk image through firmware; see ``boot`` for the console protocol. The boot also
    ends as soon as the console shows one of ``stop_on`` (e.g. a firmware's refusal). With ``tpm``,
    ``tpm_state`` keeps the TPM from one boot to the next (default: a new TPM for this boot); with
    ``keep_vars`` the boot writes the firmware's variables back into ``vars_file`` (boot order,
    systemd-boot's state), as one machine's flash would keep them. See firmware_argv for the rest."""
    with tempfile.TemporaryDirectory(prefix="hadron-qemu-") as td:
        work = Path(td)
        swtpm: subprocess.Popen[bytes] | None = None
        sock = None
        if tpm:
            swtpm, sock = start_swtpm(tpm_state or work / "tpm", work / "swtpm.sock")
        try:
            argv = firmware_argv(disk, firmware, work, vars_file=vars_file, tpm_socket=sock,
                                 extra_disks=extra_disks, reboot=reboot)
            res = run_console([*argv, "-serial", "stdio", "-monitor", "none", "-display", "none"],
                              timeout=timeout, echo=echo, stop_on=stop_on)
            if keep_vars and vars_file is not None:
                shutil.copyfile(work / "OVMF_VARS.fd", vars_file)
            return res
        finally:
            if swtpm is not None and swtpm.poll() is None:
                swtpm.kill()
                swtpm.wait()


def interactive_disk(disk: Path, firmware: str, *, vars_file: Path | None = None, tpm: bool = False) -> int:
    """Boot a whole disk through firmware with the serial console on this terminal (Ctrl-A X quits)."""
    with tempfile.TemporaryDirectory(prefix="hadron-qemu-") as td:
        work = Path(td)
        swtpm, sock = start_swtpm(work / "tpm") if tpm else (None, None)
        try:
            return subprocess.call([*firmware_argv(disk, firmware, work, vars_file=vars_file, tpm_socket=sock),
                                    "-nographic"])
        finally:
            if swtpm is not None:
                swtpm.kill()
                swtpm.wait()


def run_console(argv: list[str], *, timeout: float, echo: bool, stop_on: tuple[bytes, ...] = ()) -> BootResult:
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
                if any(s in buf for s in stop_on):
                    time.sleep(1)  # let the rest of the message arrive
                    break
            elif proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    text = buf.decode(errors="replace").replace("\r", "")
    m = re.search(r"HADRON-CHECK state=(\S*)", text)
    failed = re.findall(r"HADRON-FAILED (\S+)", text)
    pcr = re.search(r"HADRON-PCR11 ([0-9A-Fa-f]{64})", text)
    return BootResult(m.group(1) if m else None, failed, seen_check, time.monotonic() - t0, text,
                      pcr.group(1).lower() if pcr else None)


def interactive(kernel: Path, disk: Path, append: str = "") -> int:
    """Boot with the serial console attached to this terminal (Ctrl-A X quits)."""
    return subprocess.call([*qemu_argv(kernel, disk, append=append), "-nographic"])
