"""Boot to a settled system: Hadron's image versus a Debian 12 peer on the same kernel, side by side.

The peer is Debian 12 minbase with systemd-sysv, udev and kmod (mmdebstrap from the host's own Debian apt
sources), given the image's kernel modules; both boot the image's kernel with the same QEMU command
line (``hadron.boot.qemu``: TCG, one vCPU, 1 GiB, virtio-blk ext4 root made by ``mkfs.ext4 -d``,
direct kernel boot) and carry the same report unit (``hadron.boot.qemu.CHECK_UNIT``), ordered after
multi-user.target, which runs ``systemctl is-system-running --wait`` and writes the state to
/dev/kmsg. A boot's time is from QEMU's start to that line on the serial console. Every boot starts
from a fresh copy of its disk; the two systems boot alternately. Printed: each boot, the medians,
their ratio (goal <= 0.5), the failed units (must be none) and systemd-analyze's kernel/userspace
split. ``--breakdown`` adds critical-chain and blame from one more boot of each; ``--paths`` also
times Hadron's trusted (systemd-boot, signed UKI, OVMF Secure Boot, swtpm) and GRUB (SeaBIOS, OVMF)
boot paths through ``hadron boot --check``.

Needs root, mmdebstrap, qemu-system-x86_64 and a built image (``hadron build IMAGE``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hadron.boot import qemu
from hadron.boot.disk import make_root_fs
from hadron.engine.mirrors import debian_binary_sources

SUITE = "bookworm"
PEER_PACKAGES = ("systemd-sysv", "udev", "kmod")
GOAL = 0.5


@dataclass
class System:
    name: str
    root: Path
    disk: Path
    boots: list[qemu.BootResult] = field(default_factory=list)

    @property
    def seconds(self) -> list[float]:
        return [b.seconds_to_check for b in self.boots if b.seconds_to_check is not None]


def hadron(*args: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-m", "hadron", *args, "--json"], capture_output=True, text=True)
    try:
        doc: dict[str, Any] = json.loads(res.stdout)
    except json.JSONDecodeError:
        sys.exit(f"`hadron {' '.join(args)} --json` failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return doc | {"exit_status": res.returncode}


def image_root(image: str, build_args: list[str]) -> Path:
    doc = hadron("build", image, *build_args)
    if not doc.get("ok"):
        sys.exit(f"`hadron build {image}` failed; run it without --json to see why")
    return Path(doc["images"][image]["path"]) / "rootfs"


def make_peer(dest: Path) -> None:
    """Debian 12 minbase + systemd-sysv + udev."""
    sources = debian_binary_sources(SUITE)
    if not sources:
        sys.exit(f"the host's apt configuration has no Debian {SUITE} sources signed by Debian's keyring")
    t0 = time.monotonic()
    res = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                          "mmdebstrap", "--mode=root", "--variant=minbase", "--include=" + ",".join(PEER_PACKAGES),
                          SUITE, str(dest), "-"], input=sources, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"mmdebstrap failed ({res.returncode}):\n{res.stderr[-3000:]}")
    (dest / "etc/hostname").write_text("debian\n")
    print(f"peer: Debian {SUITE} minbase + {', '.join(PEER_PACKAGES)} in {time.monotonic() - t0:.0f}s, "
          f"{du(dest) / 1e6:.1f} MB", flush=True)


def give_modules(peer: Path, kernel_modules: Path) -> None:
    """The image kernel's modules in the peer (replacing those of another kernel build)."""
    target = peer / "usr/lib/modules"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(kernel_modules, target, symlinks=True)


def du(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def prepare(system: System, work: Path, *, breakdown: bool) -> None:
    """The system's pristine disk: a copy of its tree with the report unit, as ext4."""
    tree = work / f"{system.name}-tree"
    if tree.exists():
        shutil.rmtree(tree)
    qemu.copy_tree(system.root, tree)
    qemu.add_check_unit(tree, breakdown=breakdown)
    make_root_fs(tree, system.disk, label="root")
    shutil.rmtree(tree)


def boot_once(system: System, kernel: Path, work: Path, timeout: float) -> qemu.BootResult:
    disk = work / "boot.img"
    shutil.copyfile(system.disk, disk)
    try:
        res = qemu.boot(kernel, disk, timeout=timeout, echo=False)
    finally:
        disk.unlink(missing_ok=True)
    t = f"{res.seconds_to_check:5.1f}s" if res.seconds_to_check else "never"
    analyze = (res.reported("TIME") or ["(no systemd-analyze)"])[0]
    print(f"  {system.name:8} {t}  state={res.state} failed={','.join(res.failed) or 'none'}  {analyze}",
          flush=True)
    return res


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def print_breakdown(system: System, res: qemu.BootResult) -> None:
    print(f"\n{system.name}: systemd-analyze critical-chain")
    for line in res.reported("CHAIN"):
        print("   ", line)
    print(f"{system.name}: systemd-analyze blame (top 30)")
    for line in res.reported("BLAME"):
        print("   ", line)
    cpu = res.reported("CPU")
    if cpu:
        user, nice, system_, idle, iowait, irq, softirq = (int(x) / 100 for x in cpu[0].split()[1:8])
        print(f"{system.name}: CPU time at the report (/proc/stat): user {user + nice:.1f}s, system {system_:.1f}s, "
              f"irq {irq + softirq:.1f}s, idle {idle:.1f}s, iowait {iowait:.1f}s")
    print(f"{system.name}: CPU time of the running services' cgroups (usage_usec)")
    rows = sorted((int(line.split()[1]), line.split()[-1])
                  for line in res.reported("CGROUP") if line.startswith("usage_usec"))
    for usec, cg in reversed(rows):
        print(f"    {usec / 1e6:6.2f}s {cg}")


def other_paths(image: str, grub_image: str, build_args: list[str], work: Path, timeout: float) -> None:
    keys = work / "keys"
    subprocess.run([sys.executable, "-m", "hadron", "keys", "generate", str(keys)], check=True, capture_output=True)
    runs = [("trusted (systemd-boot + signed UKI, OVMF SB, swtpm)", ["boot", image, "--trusted", "--keys", str(keys)]),
            ("grub + dracut, SeaBIOS", ["boot", grub_image, "--grub", "bios"]),
            ("grub + dracut, OVMF", ["boot", grub_image, "--grub", "uefi"])]
    print("\nother boot paths (hadron boot --check, QEMU start to the report):")
    for what, args in runs:
        doc = hadron(*args, "--check", "--timeout", str(timeout), *build_args)
        secs = doc.get("seconds_to_multi_user")
        shown = f"{secs:5.1f}s" if secs else "never"
        failed = ",".join(doc.get("failed_units") or []) or "none"
        print(f"  {shown}  {what}: state={doc.get('state')} failed={failed}  {doc.get('systemd_analyze_time') or ''}",
              flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="core")
    ap.add_argument("--boots", type=int, default=3, help="boots of each system (default 3)")
    ap.add_argument("--toolchain", help="toolchain profile of the image (default: hadron.toml's)")
    ap.add_argument("--peer", type=Path, help="reuse (or make and keep) the Debian peer tree here")
    ap.add_argument("--breakdown", action="store_true", help="one more boot of each with critical-chain and blame")
    ap.add_argument("--paths", action="store_true", help="also time the trusted and GRUB boot paths")
    ap.add_argument("--grub-image", default="core-grub")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    build_args = ["--toolchain", args.toolchain] if args.toolchain else []

    root = image_root(args.image, build_args)
    kernel = root / "boot/vmlinuz"
    print(f"image: {args.image} ({root}), rootfs {du(root) / 1e6:.1f} MB; kernel {kernel.resolve().name}")
    with tempfile.TemporaryDirectory(prefix="hadron-bench-boot-", dir="/var/tmp") as td:
        work = Path(td)
        peer_root = args.peer or work / "debian"
        if not (peer_root / "usr/lib/os-release").exists():
            make_peer(peer_root)
        give_modules(peer_root, root / "usr/lib/modules")
        systems = [System("hadron", root, work / "hadron.img"), System("debian", peer_root, work / "debian.img")]
        for s in systems:
            prepare(s, work, breakdown=False)
        print(f"\n{args.boots} boots each, alternating:")
        for i in range(args.boots):
            for s in systems if i % 2 == 0 else reversed(systems):
                s.boots.append(boot_once(s, kernel, work, args.timeout))
        print("\nmedian seconds from QEMU start to `is-system-running` = running:")
        medians = {s.name: median(s.seconds) for s in systems}
        for s in systems:
            m = medians[s.name]
            failed = sorted({u for b in s.boots for u in b.failed})
            states = sorted({str(b.state) for b in s.boots})
            print(f"  {s.name:8} {m:.1f}s" if m is not None else f"  {s.name:8} never",
                  f"(of {', '.join(f'{x:.1f}' for x in s.seconds)}); states {', '.join(states)};"
                  f" failed units: {', '.join(failed) or 'none'}")
        h, d = medians["hadron"], medians["debian"]
        ok = all(b.ok for s in systems for b in s.boots)
        if h is not None and d is not None:
            print(f"ratio hadron/debian: {h / d:.2f} (goal <= {GOAL})")
        if args.breakdown:
            for s in systems:
                prepare(s, work, breakdown=True)
                print_breakdown(s, boot_once(s, kernel, work, args.timeout))
        if args.paths:
            other_paths(args.image, args.grub_image, build_args, work, args.timeout)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
