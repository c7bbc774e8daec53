"""The system extension matrix: one payload in the variants a base must tell apart, checked on the
host (sysext.verify_sysext) and in a VM booted from the base's immutable disk under Secure Boot,
where systemd-sysext merges each variant alone with the base's own image policy.

Variants: signed with the UEFI db key (the kernel checks it against the platform keyring); signed
with a key whose certificate is only in the disk's /usr/lib/verity.d (systemd checks it in user
space); dm-verity without a signature; a bare erofs file; signed with a key nobody trusts; the root
hash in the signature partition changed; one data byte changed after signing (it merges, reading
the changed block fails with EIO); extension-release with another ID, SYSEXT_LEVEL or
ARCHITECTURE, or under another name than the file's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hadron import runner
from hadron.boot import immutable, qemu, secureboot
from hadron.errors import HadronError
from hadron.image.build import BuiltImage
from hadron.lifecycle import sysext

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("openssl", "sfdisk")
NAME = "hadron-hello"
MATRIX_DIR = "usr/share/hadron-sysext-matrix"
USERSPACE_CERT = "usr/lib/verity.d/hadron-sysext-test.crt"
MARKER = b"HADRON-PAYLOAD-BLOCK "
HELLO = "hello from a system extension"
# What each variant must do in the VM: "merges" (the binary runs, its data reads), "eio" (merges,
# reading the changed block fails), "refused" (nothing merged).
EXPECTED = {
    "signed-db-key": "merges",
    "signed-verity-d": "merges",
    "verity-unsigned": "refused",
    "bare-erofs": "refused",
    "untrusted-key": "refused",
    "signature-roothash-changed": "refused",
    "data-byte-flipped": "eio",
    "wrong-id": "refused",
    "wrong-level": "refused",
    "wrong-architecture": "refused",
    "wrong-name": "refused",
}
# For each variant in turn: put it alone in /run/extensions, refresh with the base's policy, look
# for the payload, run it, read its data, report, remove it.
PROBE = rf"""#!/bin/sh
mkdir -p /run/extensions
for d in /{MATRIX_DIR}/*/; do
  v=$(basename "$d")
  cp "${{d}}{NAME}.raw" /run/extensions/{NAME}.raw
  msg=$(systemd-sysext refresh 2>&1 | tr '\n' ' ' | cut -c1-300)
  merged=no; run=; read=
  if [ -e /usr/bin/{NAME} ]; then
    merged=yes; run=$(/usr/bin/{NAME} 2>&1)
    if cat /usr/share/{NAME}/blocks > /dev/null 2>/run/sysext-read; then read=ok; else read=$(cat /run/sysext-read); fi
  fi
  echo "$v|merged=$merged|run=$run|read=$read|msg=$msg"
  rm -f /run/extensions/{NAME}.raw
  systemd-sysext refresh > /dev/null 2>&1
done
"""


def write_payload(root: Path) -> Path:
    """The payload: a program and a data file of recognisable blocks."""
    (root / "usr/bin").mkdir(parents=True)
    prog = root / "usr/bin" / NAME
    prog.write_text(f'#!/bin/sh\necho "{HELLO}"\n')
    prog.chmod(0o755)
    (root / "usr/share" / NAME).mkdir(parents=True)
    (root / "usr/share" / NAME / "blocks").write_bytes(MARKER * 8192)
    return root


def new_key(work: Path, name: str) -> tuple[Path, Path]:
    """A throw-away RSA key and self-signed certificate (openssl)."""
    key, crt = work / f"{name}.key", work / f"{name}.crt"
    runner.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt, "-days",
                "3650", "-subj", f"/CN=Hadron sysext matrix {name} (TEST KEY)"], what="making a test key")
    return key, crt


def _partition(path: Path, role: str) -> tuple[int, int]:
    res = runner.run(["sfdisk", "--json", path], what=f"reading {path}")
    for p in json.loads(res.stdout)["partitiontable"]["partitions"]:
        if sysext.X86_64_TYPES.get(p["type"].upper()) == role:
            return p["start"] * 512, p["size"] * 512
    raise HadronError(f"{path} has no {role} partition")


def change_signed_roothash(path: Path) -> None:
    """Change one digit of the root hash in the signature partition's JSON (the length stays)."""
    off, size = _partition(path, "root-verity-sig")
    with open(path, "r+b") as f:
        f.seek(off)
        raw = f.read(size)
        doc = json.loads(raw.rstrip(b"\0"))
        h = doc["rootHash"]
        doc["rootHash"] = h[:-1] + ("0" if h[-1] != "0" else "1")
        new = json.dumps(doc, separators=(",", ":")).encode()
        f.seek(off)
        f.write(new + b"\0" * (size - len(new)))


def flip_data_byte(path: Path) -> None:
    """Flip a byte inside the payload's data blocks in the erofs partition."""
    off, size = _partition(path, "root")
    with open(path, "r+b") as f:
        f.seek(off)
        data = f.read(size)
        at = data.find(MARKER * 4)
        if at < 0:
            raise HadronError(f"the payload's blocks are not stored plainly in {path}")
        f.seek(off + at + 4096 + 3)
        f.write(bytes([data[at + 4096 + 3] ^ 0xFF]))


def build_variants(base: BuiltImage, keys: secureboot.KeySet, work: Path, log: Path) -> dict[str, Path]:
    """Every variant as work/matrix/<variant>/hadron-hello.raw, plus the user-space certificate."""
    payload = write_payload(work / "payload")
    userspace_key, userspace_crt = new_key(work, "verity-d")
    rogue_key, rogue_crt = new_key(work, "untrusted")
    good = sysext.release_for(base)
    out: dict[str, Path] = {}

    def make(variant: str, **kw: object) -> Path:
        path = work / "matrix" / variant / f"{NAME}.raw"
        args = {"form": "signed", "key": keys.db.key, "cert": keys.db.crt, **kw}
        sysext.build_sysext(base, NAME, [payload], path, log=log, **args)  # type: ignore[arg-type]
        out[variant] = path
        return path

    make("signed-db-key")
    make("signed-verity-d", key=userspace_key, cert=userspace_crt)
    make("verity-unsigned", form="verity")
    make("bare-erofs", form="bare")
    make("untrusted-key", key=rogue_key, cert=rogue_crt)
    change_signed_roothash(make("signature-roothash-changed"))
    flip_data_byte(make("data-byte-flipped"))
    make("wrong-id", release={**good, "ID": "otheros"})
    make("wrong-level", release={**good, "SYSEXT_LEVEL": "99"})
    make("wrong-architecture", release={**good, "ARCHITECTURE": "arm64"})
    make("wrong-name", release_name="another-name")
    assert userspace_crt == work / "verity-d.crt"
    return out


@dataclass
class VariantResult:
    variant: str
    expected: str
    vm: str  # merges / eio / refused / missing / other
    detail: str
    host_accepts: bool
    host_reasons: list[str]

    @property
    def ok(self) -> bool:
        # the host's verify must agree: it accepts exactly the variants that merge cleanly
        return self.vm == self.expected and self.host_accepts == (self.expected == "merges")

    def to_json(self) -> dict[str, object]:
        return {"variant": self.variant, "expected": self.expected, "vm": self.vm, "detail": self.detail,
                "host_accepts": self.host_accepts, "host_reasons": self.host_reasons, "ok": self.ok}


def parse_line(line: str) -> tuple[str, dict[str, str]]:
    variant, *fields = line.split("|")
    return variant, {k: v for k, _, v in (f.partition("=") for f in fields)}


def classify(f: dict[str, str]) -> str:
    if f.get("merged") != "yes":
        return "refused"
    if f.get("run") != HELLO:
        return "other"
    if f.get("read") == "ok":
        return "merges"
    return "eio" if "I/O error" in f.get("read", "") else "other"


@dataclass
class MatrixResult:
    boot: qemu.BootResult
    variants: list[VariantResult]

    @property
    def ok(self) -> bool:
        return self.boot.ok and len(self.variants) == len(EXPECTED) and all(v.ok for v in self.variants)


def check_sysext_matrix(base: BuiltImage, keys: secureboot.KeySet, work: Path, *, timeout: float, echo: bool,
                        log: Path, epoch: int = 0,
                        boot: Callable[..., qemu.BootResult] = qemu.boot_disk) -> MatrixResult:
    """Build the variants, judge each on the host, then boot the base's immutable disk carrying them."""
    variants = build_variants(base, keys, work, log)
    host_certs = [keys.db.crt, work / "verity-d.crt"]
    verdicts = {v: sysext.verify_sysext(p, base, host_certs, log=log) for v, p in variants.items()}
    files = {f"{MATRIX_DIR}/{v}/{NAME}.raw": p.read_bytes() for v, p in variants.items()}
    files[USERSPACE_CERT] = (work / "verity-d.crt").read_bytes()
    store = work / "OVMF_VARS.fd"
    secureboot.enroll_ovmf_vars(keys, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
    disk = immutable.build_immutable_disk(base, keys, work / "disk.raw", log=log, check=True, probe=PROBE,
                                          extra_files=files, epoch=epoch)
    res = boot(disk.path, "secure-boot", vars_file=store, tpm=True, timeout=timeout, echo=echo)
    seen = dict(parse_line(ln) for ln in res.reported("PROBE") if "|merged=" in ln)
    out = []
    for v, expected in EXPECTED.items():
        f = seen.get(v)
        vm = classify(f) if f is not None else "missing"
        detail = "" if f is None else (f.get("msg", "") if vm == "refused" else f"run: {f.get('run')}; read: "
                                       f"{f.get('read')}")
        out.append(VariantResult(v, expected, vm, detail.strip(), verdicts[v].accepted, verdicts[v].reasons))
    return MatrixResult(res, out)
