"""The immutable lifecycle, end to end, on core-immutable (core plus its partition definitions and
sysupdate transfers), every boot under Secure Boot with our test keys enrolled and a swtpm TPM:

- the immutable disk: read-only erofs root on /dev/mapper/root whose root hash is the signed UKI's
  roothash=, writes refused with EROFS, /var made at first boot and kept, systemd-boot's counter
  blessed away; a UKI with one root hash digit changed and a root partition with one byte changed
  do not reach multi-user.target;
- the system extension matrix: only the two trusted variants merge, the flipped byte gives EIO,
  every other variant is refused, and `hadron sysext verify` agrees with the VM on every one;
- A/B: v1 installs v2, v2 boots and is blessed and installs v3, v3 fails its health check until its
  tries run out and the machine is back on v2 on its own.
Marked e2e; CI runs it after the trusted tier (the core packages are cached by then)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hadron.engine.fetch import file_sha256

ROOT = Path(__file__).resolve().parents[1]
TOOLCHAIN = os.environ.get("HADRON_E2E_TOOLCHAIN", "host")
TOOLS = ("bwrap", "qemu-system-x86_64", "swtpm", "sbsign", "mcopy", "mdir", "sfdisk", "virt-fw-vars", "openssl",
         "mkfs.ext4")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(5400),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason=f"needs {', '.join(TOOLS)}"),
    pytest.mark.skipif(not Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd").is_file(), reason="needs ovmf"),
]


def hadron(*args: str, timeout: float = 5400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hadron", *args, "--toolchain", TOOLCHAIN], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def hadron_plain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hadron", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("keys") / "k"
    res = hadron_plain("keys", "generate", str(d))
    assert res.returncode == 0, res.stderr
    return d


def _json(res: subprocess.CompletedProcess[str]) -> dict[str, object]:
    text = res.stdout.strip()
    return json.loads(text) if text.startswith("{") else {}


def test_immutable_disk_layout(keys: Path, tmp_path: Path) -> None:
    out = tmp_path / "imm.raw"
    res = hadron("image", "disk", "core-immutable", "--boot", "immutable", "--keys", str(keys), "-o", str(out),
                 "--version", "7", "--json")
    doc = _json(res)
    assert res.returncode == 0 and doc, res.stderr
    layout = doc["layout"]
    assert isinstance(layout, list)
    roles = [(p["type"], p["label"]) for p in layout]
    assert roles == [("esp", "ESP"), ("root", "core-immutable_7"), ("root-verity", "core-immutable_7_verity"),
                     ("root-verity-sig", "core-immutable_7_verity_sig"), ("root", "_empty"),
                     ("root-verity", "_empty"), ("root-verity-sig", "_empty")]
    h = str(doc["roothash"])
    # the data and hash partitions carry the root hash's halves as their UUIDs
    assert layout[1]["uuid"].replace("-", "") == h[:32] and layout[2]["uuid"].replace("-", "") == h[32:]
    assert f"roothash={h}" in str(doc["cmdline"]) and doc["uki"] == "EFI/Linux/core-immutable_7+3.efi"
    print("\nimmutable disk: " + ", ".join(f"{p['type']} {p['label']} {p['bytes'] / 2**20:.2f} MiB" for p in layout))
    # byte-reproducible: the same disk again, in another directory, with another umask, time zone and locale
    again = tmp_path / "elsewhere" / "imm.raw"
    res = subprocess.run([sys.executable, "-m", "hadron", "image", "disk", "core-immutable", "--boot", "immutable",
                          "--keys", str(keys), "-o", str(again), "--version", "7", "--toolchain", TOOLCHAIN],
                         cwd=ROOT, capture_output=True, text=True, umask=0o002,
                         env={**os.environ, "TZ": "<+14>-14", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})
    assert res.returncode == 0, res.stderr
    assert file_sha256(again) == file_sha256(out), "the immutable disk differs when made a second time"
    # an image without the immutable layout is refused, and nothing is written
    res = hadron("image", "disk", "core", "--boot", "immutable", "--keys", str(keys), "-o", str(tmp_path / "x.raw"))
    assert res.returncode != 0 and "does not carry the immutable boot path" in res.stderr
    assert not (tmp_path / "x.raw").exists()


def test_immutable_boot_and_refusals(keys: Path) -> None:
    res = hadron("boot", "core-immutable", "--immutable", "--keys", str(keys), "--check", "--json",
                 "--timeout", "600")
    info = _json(res)
    assert res.returncode == 0 and info.get("ok"), f"{res.stdout[-8000:]}\n{res.stderr[-3000:]}"
    probe = info["probe"]
    assert isinstance(probe, dict)
    assert probe["root"].startswith("/dev/mapper/root erofs ro")
    assert "Read-only file system" in probe["write"]
    assert probe["verity-root-hash"] == info["roothash"] and probe["verity-status"] == "verified"
    assert probe["var"].split()[1] == "ext4" and probe["bless"] == "good"
    assert info["second_boot_probe"]["var-boots"] == "2"  # type: ignore[index]
    assert info["esp_before"] == ["core-immutable_0.1+3.efi"] and info["esp_after"] == ["core-immutable_0.1.efi"]
    attempts = {a["name"]: a for a in info["attempts"]}  # type: ignore[union-attr]
    assert attempts["uki-roothash-digit-changed"]["result"] == "refused"
    assert attempts["root-partition-byte-flipped"]["result"] == "refused"
    assert "is corrupted" in attempts["root-partition-byte-flipped"]["evidence"]
    assert probe["var"].startswith("/dev/mapper/var ") and probe["var-crypt"] == "LUKS2 1 tpm2 token(s)"
    print(f"\nimmutable boot: multi-user.target after {info['seconds_to_multi_user']:.1f}s, second boot "
          f"{info['second_boot_seconds']:.1f}s")
    for a in attempts.values():
        print(f"  {a['name']}: {a['result']} after {a['seconds']:.0f}s - {a['evidence'][:150]}")


def test_sysext_matrix(keys: Path) -> None:
    res = hadron("sysext", "check", "--keys", str(keys), "--json", "--timeout", "600")
    info = _json(res)
    rows = info.get("sysext", [])
    assert isinstance(rows, list)
    table = "\n".join(f"  {v['variant']:<28} VM {v['vm']:<8} verify {'accepts' if v['host_accepts'] else 'refuses'}"
                      f" - {(v['detail'] or '; '.join(v['host_reasons']))[:140]}" for v in rows)
    print("\nsystem extension matrix:\n" + table)
    assert res.returncode == 0 and info.get("ok"), f"{table}\n{res.stderr[-3000:]}"
    vm = {v["variant"]: v["vm"] for v in rows}
    assert [k for k, v in vm.items() if v == "merges"] == ["signed-db-key", "signed-verity-d"]
    assert vm["data-byte-flipped"] == "eio"


def test_sysext_build_and_verify_cli(keys: Path, tmp_path: Path) -> None:
    payload = tmp_path / "payload/usr/bin"
    payload.mkdir(parents=True)
    (payload / "hi").write_text("#!/bin/sh\necho hi\n")
    out = tmp_path / "hi.raw"
    res = hadron("sysext", "build", "hi", "--dir", str(tmp_path / "payload"), "--image", "core-immutable",
                 "--keys", str(keys), "-o", str(out), "--json")
    assert res.returncode == 0, res.stderr
    res = hadron("sysext", "verify", str(out), "--image", "core-immutable", "--keys", str(keys))
    assert res.returncode == 0 and "accepted" in res.stdout, res.stdout + res.stderr
    # the same file under another name no longer matches its extension-release file
    shutil.copyfile(out, tmp_path / "other.raw")
    res = hadron("sysext", "verify", str(tmp_path / "other.raw"), "--image", "core-immutable", "--keys", str(keys))
    assert res.returncode == 1 and "extension-release.other" in res.stdout


def test_update_publish_refuses_an_image_without_the_layout(keys: Path, tmp_path: Path) -> None:
    res = hadron("update", "publish", "core", str(tmp_path / "u"), "--version", "2", "--keys", str(keys))
    assert res.returncode != 0 and "does not carry the immutable boot path" in res.stderr
    assert not (tmp_path / "u").exists()


def test_ab_update_and_automatic_rollback(keys: Path) -> None:
    res = hadron("update", "check", "--keys", str(keys), "--json", "--timeout", "900")
    info = _json(res)
    runs = info.get("runs", [])
    assert isinstance(runs, list)
    for r in runs:
        print(f"\n  {r['run']}: booted v{r['version']} ({r['boots']} boot(s), {r['seconds']}s), counter "
              f"{r['boot_count_path']}, tries left {r['tries_left']}, /var boots {r['var_boots']}, "
              f"ESP {r['esp_after']}")
    assert res.returncode == 0 and info.get("ok"), f"{json.dumps(info, indent=1)[-6000:]}\n{res.stderr[-3000:]}"
    assert info["fell_back"] is True
    assert [r["version"] for r in runs] == ["1", "2", "2"]
