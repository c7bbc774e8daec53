"""The trusted boot path, end to end: the core image's signed UKI and systemd-boot on a GPT disk, booted
by OVMF with Secure Boot enforced (our test keys enrolled) and a swtpm TPM 2.0. The system must reach
multi-user.target with zero failed units and read the PCR 11 the UKI predicts after systemd-pcrphase's
measurements; a secret it seals to the signed PCR 11 policy must unseal on that boot and on a renewed
UKI signed with the same key, and be refused after PCR 11 is extended, under a UKI whose policy another
key signed, and without a TPM; the same disk with one byte of the UKI changed must be refused by the
firmware. Marked e2e; CI runs it after the core tier
(the image is cached by then)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN = os.environ.get("HADRON_E2E_TOOLCHAIN", "host")
TOOLS = ("bwrap", "qemu-system-x86_64", "swtpm", "sbsign", "mcopy", "sfdisk", "virt-fw-vars")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(5400),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
    pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd").is_file(), reason="needs ovmf"),
]


def hadron(*args: str, timeout: float = 5400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hadron", *args, "--toolchain", TOOLCHAIN], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "k"
    res = subprocess.run([sys.executable, "-m", "hadron", "keys", "generate", str(d)], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return d


def test_signed_uki_boots_with_secure_boot_and_pcr11_matches(keys: Path) -> None:
    res = hadron("boot", "core", "--trusted", "--keys", str(keys), "--check", "--json", "--timeout", "900")
    info = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
    assert res.returncode == 0 and info.get("ok"), f"{res.stdout[-8000:]}\n{res.stderr[-3000:]}"
    assert info["state"] == "running" and info["failed_units"] == []
    assert info["pcr11"] == info["pcr11_expected"]
    assert info["pcr11_policy_signed"] is True
    # The unseal matrix: a secret the booted system sealed to the UKI's signed PCR 11 policy.
    verdicts = {c["case"]: c["result"] for c in info["unseal"]}
    assert verdicts == {"signed-boot": "unsealed", "after-pcrextend": "refused", "renewed-uki": "unsealed",
                        "other-pcr-key": "refused", "no-tpm": "refused"}, info["unseal"]
    assert info["unseal_ok"] is True
    # each refusal carries systemd's own reason
    assert all(c["detail"] for c in info["unseal"] if c["result"] == "refused")
    print(f"\nSecure Boot + TPM boot: multi-user.target after {info['seconds_to_multi_user']:.1f}s; "
          f"disk {info['disk_bytes'] / 2**20:.0f} MiB, UKI {info['uki_bytes'] / 2**20:.1f} MiB; "
          f"PCR 11 {info['pcr11']}")
    boots = info["unseal_boot_seconds"]  # by boot: "signed" ran the first two cases
    for c in info["unseal"]:
        print(f"  unseal {c['case']}: {c['result']} (boot {boots.get(c['case'], boots['signed']):.0f}s)"
              + (f" - {c['detail'][:160]}" if c["result"] == "refused" else ""))


def test_tampered_uki_is_refused_by_the_firmware(keys: Path, tmp_path: Path) -> None:
    from hadron.boot import qemu, secureboot

    out = tmp_path / "trusted.raw"
    res = hadron("image", "disk", "core", "--boot", "trusted", "--keys", str(keys), "-o", str(out), "--json")
    assert res.returncode == 0, res.stderr
    # Change one byte of the UKI on the ESP (partition 1 starts at 1 MiB), as an attacker with write
    # access to the disk could.
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    esp = f"{out}@@{2**20}"
    names = subprocess.run(["mdir", "-i", esp, "-b", "::/EFI/Linux"], capture_output=True, text=True, env=env,
                           check=True).stdout.split()
    assert len(names) == 1
    efi = tmp_path / "uki.efi"
    subprocess.run(["mcopy", "-i", esp, names[0], str(efi)], check=True, env=env)
    data = bytearray(efi.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside .linux, the largest section
    efi.write_bytes(bytes(data))
    subprocess.run(["mcopy", "-o", "-i", esp, str(efi), names[0]], check=True, env=env)

    ks = secureboot.load_keys(keys)
    store = tmp_path / "vars.fd"
    secureboot.enroll_ovmf_vars(ks, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
    boot = qemu.boot_disk(out, "secure-boot", vars_file=store, tpm=True, timeout=240, echo=False,
                          stop_on=(b"Security Violation", b"Access Denied", b"Linux version"))
    assert boot.state is None, "a tampered UKI must not boot"
    assert "Linux version" not in boot.console
    # systemd-boot reports the firmware's verdict on the console.
    assert "Security Violation" in boot.console or "Access Denied" in boot.console, boot.console[-3000:]
