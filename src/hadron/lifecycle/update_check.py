"""The A/B update and rollback run, in a VM under Secure Boot with a TPM, one machine throughout
(one disk, one firmware variable store, one TPM):

1. version 1 boots from its immutable disk; a file is written to /var; the update set of version 2
   is on a second disk, and systemd-sysupdate installs it (slot B, the UKI with three tries);
2. the machine boots version 2 (newest first); systemd-bless-boot marks it good after
   boot-complete.target; systemd-sysupdate installs version 3 from the next medium into slot A;
3. version 3 carries a unit that boot-complete.target requires and that fails (FailureAction=
   reboot): each attempt costs a try, and when they have run out systemd-boot boots version 2
   again, with no one touching the machine.
After every run the check reports the version that booted, its tries (LoaderBootCountPath), /var,
the UKIs on the ESP (read from the disk file) and whether the machine fell back.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from hadron import runner
from hadron.boot import immutable, qemu, secureboot
from hadron.image.build import BuiltImage
from hadron.lifecycle import update

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("mkfs.ext4",)
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
PROBE = rf"""#!/bin/sh
. /usr/lib/os-release
echo "version $IMAGE_VERSION"
efivar() {{ f=/sys/firmware/efi/efivars/$1-{LOADER_GUID}; [ -r "$f" ] && tail -c +5 "$f" | tr -d '\000'; }}
echo "count-path $(efivar LoaderBootCountPath)"
echo "bless $(/usr/lib/systemd/systemd-bless-boot status 2>&1)"
echo "ukis $(ls /boot/EFI/Linux | tr '\n' ' ')"
f=/var/lib/hadron-check/boots
mkdir -p /var/lib/hadron-check && cat /proc/sys/kernel/random/boot_id >> $f
echo "var-boots $(wc -l < $f)"
if [ -b /dev/vdb ]; then
  mkdir -p /run/hadron-update && mount -o ro /dev/vdb /run/hadron-update
  /usr/lib/systemd/systemd-sysupdate --transfer-source=/run/hadron-update update > /run/sysupdate.log 2>&1
  echo "sysupdate-exit $?"
  tail -n 6 /run/sysupdate.log | sed 's/^/sysupdate /'
fi
"""
FAIL_UNIT = """\
[Unit]
Description=Hadron update check: a health check that fails on this version
Before=boot-complete.target
DefaultDependencies=no
After=local-fs.target

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "HADRON-HEALTH failing on purpose" > /dev/kmsg; exit 1'
FailureAction=reboot
"""
# boot-complete.target requires the failing unit (a drop-in, so no symlink is needed).
FAIL_FILES = {
    "etc/systemd/system/hadron-fail.service": FAIL_UNIT.encode(),
    "etc/systemd/system/boot-complete.target.d/50-hadron-fail.conf":
        b"[Unit]\nRequires=hadron-fail.service\nAfter=hadron-fail.service\n",
}


@dataclass
class Run:
    """One QEMU run (it may span several boots) and what it showed."""
    name: str
    result: qemu.BootResult
    probe: dict[str, str]
    esp_after: list[str]
    attempts: int  # boots that started in this run (systemd-stub's banner lines)

    def to_json(self) -> dict[str, object]:
        cp = self.probe.get("count-path", "")
        m = re.search(r"\+(\d+)(?:-(\d+))?\.efi", cp)
        return {"run": self.name, "state": self.result.state, "failed_units": self.result.failed,
                "seconds": round(self.result.seconds_total, 1), "boots": self.attempts,
                "version": self.probe.get("version"), "boot_count_path": cp or None,
                "tries_left": int(m.group(1)) if m else None,
                "tries_done": int(m.group(2)) if m and m.group(2) else (0 if m else None),
                "blessed": self.probe.get("bless"), "var_boots": self.probe.get("var-boots"),
                "sysupdate_exit": self.probe.get("sysupdate-exit"), "esp_after": self.esp_after}


@dataclass
class UpdateCheck:
    runs: list[Run] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fell_back: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and len(self.runs) == 3


def _medium(directory: Path, out: Path) -> Path:
    """An ext4 file system image holding an update directory (the second disk)."""
    size = sum(p.stat().st_size for p in directory.iterdir()) // (1 << 20) + 64
    runner.run(["mkfs.ext4", "-q", "-F", "-L", "hadron-update", "-d", directory, out, f"{size}M"],
               what="making the update medium")
    return out


def check_update_rollback(img: BuiltImage, keys: secureboot.KeySet, work: Path, *, timeout: float, echo: bool,
                          log: Path, epoch: int = 0) -> UpdateCheck:
    out = UpdateCheck()
    v2, v3 = work / "v2", work / "v3"
    update.publish(img, keys, "2", v2, log=log, check=True, probe=PROBE, epoch=epoch)
    update.publish(img, keys, "3", v3, log=log, check=True, probe=PROBE, extra_files=FAIL_FILES, epoch=epoch)
    for d in (v2, v3):
        update.verify(d, keys.db.crt, current="1")
    disk = immutable.build_immutable_disk(img, keys, work / "disk.raw", log=log, version="1", check=True,
                                          probe=PROBE, epoch=epoch)
    esp = next(p for p in disk.partitions if p.role == "esp")
    store = work / "OVMF_VARS.fd"
    secureboot.enroll_ovmf_vars(keys, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
    tpm = work / "tpm"

    def run(name: str, medium: Path | None, reboot: bool = False) -> Run:
        res = qemu.boot_disk(disk.path, "secure-boot", vars_file=store, tpm=True, tpm_state=tpm,
                             timeout=timeout, echo=echo, extra_disks=(medium,) if medium else (), reboot=reboot,
                             keep_vars=True)
        probe = immutable.probe_values(res)
        r = Run(name, res, probe, immutable.esp_listing(disk.path, esp), res.console.count("Linux version "))
        out.runs.append(r)
        return r

    a = run("v1, installs v2", _medium(v2, work / "medium-v2.img"))
    _expect(out, a, version="1", var_boots="1", sysupdate="0",
            esp=["core-immutable_1.efi", "core-immutable_2+3-0.efi"], image_id=disk.image_id)
    b = run("v2, installs v3", _medium(v3, work / "medium-v3.img"))
    _expect(out, b, version="2", var_boots="2", sysupdate="0",
            esp=["core-immutable_2.efi", "core-immutable_3+3-0.efi"], image_id=disk.image_id,
            count_path="core-immutable_2+2-1.efi")
    shutil.rmtree(v2)
    shutil.rmtree(v3)
    c = run("v3 fails, back to v2", None, reboot=True)
    _expect(out, c, version="2", var_boots="3", sysupdate=None,
            esp=["core-immutable_2.efi", "core-immutable_3+0-3.efi"], image_id=disk.image_id)
    health = c.result.console.count("HADRON-HEALTH failing on purpose")
    if health != immutable.TRIES:
        out.problems.append(f"version 3's failing health check ran {health} times, not {immutable.TRIES}")
    out.fell_back = c.probe.get("version") == "2" and any("+0-" in n for n in c.esp_after)
    return out


def _expect(out: UpdateCheck, r: Run, *, version: str, var_boots: str, sysupdate: str | None, esp: list[str],
            image_id: str, count_path: str | None = None) -> None:
    p = r.probe
    want_esp = sorted(n.replace("core-immutable", image_id) for n in esp)
    checks = [
        (r.result.ok, f"state {r.result.state}, failed units {r.result.failed}"),
        (p.get("version") == version, f"booted version {p.get('version')!r}, expected {version}"),
        (p.get("var-boots") == var_boots, f"/var has seen {p.get('var-boots')!r} boots, expected {var_boots}"),
        (sysupdate is None or p.get("sysupdate-exit") == sysupdate,
         f"systemd-sysupdate exited {p.get('sysupdate-exit')!r}"),
        (r.esp_after == want_esp, f"the ESP holds {r.esp_after}, expected {want_esp}"),
        (count_path is None or p.get("count-path", "").endswith(count_path.replace("core-immutable", image_id)),
         f"systemd-boot counted {p.get('count-path')!r}, expected …{count_path}"),
    ]
    out.problems += [f"{r.name}: {why}" for ok, why in checks if not ok]
