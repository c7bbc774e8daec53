"""System extension images (sysext DDIs): made by the base image's own systemd-repart from a tree
of /usr and /opt files, and checked the way the base will check them when systemd-sysext merges.

build: the tree gets ``/usr/lib/extension-release.d/extension-release.NAME`` (ID, SYSEXT_LEVEL and
ARCHITECTURE of the base), then repart writes a GPT image with the erofs root, its dm-verity hash
tree and the root hash signed with the given key (``--make-ddi=sysext``'s definitions, from the base
image). ``form`` also makes the weaker kinds the base must refuse: verity without a signature, and
a bare erofs file.

verify: what systemd-sysext on the base would say, before anyone boots: the partition types (the
architecture), the signature (PKCS#7 over the root hash, by a certificate the base trusts: the UEFI
db certificate the kernel's platform keyring holds under Secure Boot, or one in the base's
/usr/lib/verity.d), the hash tree against the root hash (the image's veritysetup), and the
extension-release file against the base's os-release.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hadron import runner
from hadron.boot import disk, immutable, repart
from hadron.boot.grub import run_in_image
from hadron.errors import HadronError
from hadron.image.build import BuiltImage

Form = Literal["signed", "verity", "bare"]
FORMS: tuple[Form, ...] = ("signed", "verity", "bare")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RELEASE_DIR = "usr/lib/extension-release.d"
SYSEXT_DEFINITIONS = "usr/lib/systemd/repart/definitions/sysext.repart.d"
VERITY_D = ("etc/verity.d", "usr/local/lib/verity.d", "usr/lib/verity.d")
# systemd's architecture names (os-release ARCHITECTURE=, uname machine → name).
ARCHITECTURES = {"x86_64": "x86-64", "aarch64": "arm64", "riscv64": "riscv64"}
# Discoverable Partitions Specification type GUIDs for x86-64, and the root types of other
# architectures so that an extension built for one is named as such.
X86_64_TYPES = {
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "root",
    "2C7357ED-EBD2-46D9-AEC1-23D437EC2BF5": "root-verity",
    "41092B05-9FC8-4523-994F-2DEF0408B176": "root-verity-sig",
    "8484680C-9521-48C6-9C11-B0720656F69E": "usr",
    "77FF5F63-E7B6-4633-ACF4-1565B864C0E6": "usr-verity",
    "E7BB33FB-06CF-4E81-8273-E543B413E2E2": "usr-verity-sig",
}
OTHER_ARCH_ROOTS = {
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "arm64",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "x86",
    "72EC70A6-CF74-40E6-BD49-4BDA08E8F224": "riscv64",
}
EROFS_MAGIC = (0xE0F5E1E2).to_bytes(4, "little")
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("openssl", "sfdisk", "cp")


@dataclass(frozen=True)
class Sysext:
    path: Path
    name: str
    form: Form
    roothash: str | None
    release: dict[str, str]
    size: int


def base_release(base: BuiltImage) -> dict[str, str]:
    return immutable.os_release(base.rootfs)


def release_for(base: BuiltImage, arch: str = "x86_64") -> dict[str, str]:
    """The extension-release fields that match ``base``."""
    rel = base_release(base)
    fields = {"ID": rel.get("ID", ""), "ARCHITECTURE": ARCHITECTURES.get(arch, arch)}
    if rel.get("SYSEXT_LEVEL"):
        fields["SYSEXT_LEVEL"] = rel["SYSEXT_LEVEL"]
    else:
        fields["VERSION_ID"] = rel.get("VERSION_ID", "")
    return fields


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise HadronError(f"extension name {name!r} is not usable as a file name",
                          hint="use letters, digits, '_', '.' and '-'")
    return name


def stage_tree(sources: Sequence[Path], tree: Path, name: str, release: Mapping[str, str]) -> None:
    """Copy the /usr and /opt of each source tree into ``tree`` and write the extension-release file.
    Anything else in a source is refused: systemd-sysext merges only /usr and /opt."""
    tree.mkdir(parents=True)
    for src in sources:
        if not src.is_dir():
            raise HadronError(f"extension source {src} is not a directory")
        other = sorted(p.name for p in src.iterdir() if p.name not in ("usr", "opt"))
        if other:
            raise HadronError(f"extension source {src} has {', '.join('/' + o for o in other)}",
                              hint="a system extension carries only /usr and /opt; move the files there")
        for top in ("usr", "opt"):
            if (src / top).is_dir():
                (tree / top).mkdir(exist_ok=True)
                runner.run(["cp", "-a", "--reflink=auto", f"{src / top}/.", str(tree / top)],
                           what=f"copying {src / top}")
    if not any(tree.iterdir()):
        raise HadronError(f"the extension {name} would be empty", hint="give a directory or packages with files")
    rel = tree / RELEASE_DIR / f"extension-release.{name}"
    rel.parent.mkdir(parents=True, exist_ok=True)
    rel.write_text("".join(f"{k}={v}\n" for k, v in release.items()))


@disk.standard_umask()
def build_sysext(base: BuiltImage, name: str, sources: Sequence[Path], out: Path, *, log: Path,
                 form: Form = "signed", key: Path | None = None, cert: Path | None = None,
                 release: Mapping[str, str] | None = None, release_name: str | None = None) -> Sysext:
    """Write the extension to ``out``. ``release`` overrides the extension-release fields and
    ``release_name`` the name in its file name (both for making extensions the base must refuse)."""
    check_name(name)
    if form == "signed" and (key is None or cert is None):
        raise HadronError("a signed extension needs a private key and its certificate",
                          hint="pass --keys DIR (the db key of `hadron keys generate`)")
    fields = dict(release) if release is not None else release_for(base)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hadron-sysext-", dir=out.parent) as td:
        work = Path(td)
        stage_tree(sources, work / "tree", release_name or name, fields)
        raw = work / "ext.raw"
        roothash = None
        if form == "bare":
            run_in_image(base.rootfs, ["mkfs.erofs", "-T0", "-U", "clear", "--all-root", "/tmp/out/ext.raw",
                                       "/tmp/out/tree"], work, log, f"mkfs.erofs (extension {name})",
                         {"SOURCE_DATE_EPOCH": "0"})
        else:
            defs = repart.stage_definitions(base.rootfs / SYSEXT_DEFINITIONS, work)
            args = ["--empty=create", "--size=auto", f"--definitions={repart.SANDBOX_OUT}/{defs.name}",
                    f"--copy-source={repart.SANDBOX_OUT}/tree", f"--seed={_seed(name)}"]
            if form == "signed":
                assert key is not None and cert is not None
                shutil.copyfile(key, work / "sign.key")
                (work / "sign.key").chmod(0o600)
                shutil.copyfile(cert, work / "sign.crt")
                args += [f"--private-key={repart.SANDBOX_OUT}/sign.key",
                         f"--certificate={repart.SANDBOX_OUT}/sign.crt"]
            else:
                for p in defs.glob("*.conf"):
                    if "Verity=signature" in p.read_text():
                        p.unlink()
            parts = repart.run(base.rootfs, work, raw, log=log, what=f"systemd-repart (extension {name})", args=args)
            (work / "sign.key").unlink(missing_ok=True)
            roothash = next((p.roothash for p in parts if p.roothash), None)
        os.replace(raw, out)
    return Sysext(out, name, form, roothash, fields, out.stat().st_size)


def _seed(name: str) -> str:
    from hadron.boot.disk import stable_uuid

    return stable_uuid("sysext", name)


# ------------------------------------------------------------------------------------------- verify


@dataclass
class Verdict:
    """Whether the base would merge an extension, and why."""
    file: Path
    name: str
    accepted: bool = False
    reasons: list[str] = field(default_factory=list)  # why not (empty when accepted)
    facts: dict[str, object] = field(default_factory=dict)

    def refuse(self, reason: str) -> None:
        self.reasons.append(reason)

    def to_json(self) -> dict[str, object]:
        return {"file": str(self.file), "name": self.name, "accepted": self.accepted, "reasons": self.reasons,
                **self.facts}


def trusted_certificates(base: BuiltImage, keys_db_cert: Path | None) -> list[Path]:
    """What the base trusts for verity signatures: the UEFI db certificate (in the kernel's platform
    keyring when the machine boots with those keys enrolled) and the base's verity.d certificates."""
    certs = [keys_db_cert] if keys_db_cert is not None else []
    for d in VERITY_D:
        certs += sorted((base.rootfs / d).glob("*.crt"))
    return certs


def _partitions(path: Path) -> list[dict[str, object]] | None:
    res = runner.run(["sfdisk", "--json", str(path)], check=False, what=f"reading the partition table of {path}")
    if res.returncode != 0:
        return None
    parts: list[dict[str, object]] = json.loads(res.stdout)["partitiontable"].get("partitions", [])
    return parts


def _extract(path: Path, part: Mapping[str, object], dest: Path) -> None:
    with open(path, "rb") as src, open(dest, "wb") as dst:
        src.seek(int(str(part["start"])) * 512)
        left = int(str(part["size"])) * 512
        while left:
            chunk = src.read(min(left, 4 << 20))
            if not chunk:
                break
            dst.write(chunk)
            left -= len(chunk)


def signature_valid(roothash: str, signature: bytes, certs: Sequence[Path], work: Path) -> Path | None:
    """The trusted certificate whose key made ``signature`` (PKCS#7, DER) over the root hash (hex
    text, as systemd-repart signs it), or None."""
    content, sig = work / "roothash.txt", work / "sig.p7s"
    content.write_text(roothash)
    sig.write_bytes(signature)
    for cert in certs:
        res = runner.run(["openssl", "smime", "-verify", "-binary", "-inform", "DER", "-in", str(sig),
                          "-content", str(content), "-nointern", "-certfile", str(cert), "-CAfile", str(cert),
                          "-partial_chain", "-purpose", "any", "-out", "/dev/null"], check=False,
                         what="checking a verity signature")
        if res.returncode == 0:
            return cert
    return None


SYSEXT_CONF_DIRS = ("etc/systemd", "usr/local/lib/systemd", "usr/lib/systemd")  # first wins


def image_policy(base: BuiltImage) -> str | None:
    """The ImagePolicy= the base's systemd-sysext reads from sysext.conf and its drop-ins (a later
    setting wins; a drop-in in an earlier directory hides one of the same name), or None."""
    files: list[Path] = []
    main = next((base.rootfs / d / "sysext.conf" for d in SYSEXT_CONF_DIRS
                 if (base.rootfs / d / "sysext.conf").is_file()), None)
    if main is not None:
        files.append(main)
    dropins: dict[str, Path] = {}
    for d in reversed(SYSEXT_CONF_DIRS):
        for f in (base.rootfs / d / "sysext.conf.d").glob("*.conf"):
            dropins[f.name] = f
    files += [dropins[n] for n in sorted(dropins)]
    policy = None
    for f in files:
        section = ""
        for line in f.read_text().splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line
            elif section == "[SysExt]" and line.startswith("ImagePolicy="):
                policy = line.split("=", 1)[1].strip() or None
    return policy


def requires_signature(policy: str | None) -> bool:
    """Whether ``policy`` lets the root and usr designators be only signed or absent."""
    if policy is None:
        return False
    rules = dict(r.split("=", 1) for r in policy.split(":") if "=" in r)
    return all(d in rules and set(rules[d].split("+")) <= {"signed", "absent"} for d in ("root", "usr"))


def verify_sysext(path: Path, base: BuiltImage, certs: Sequence[Path], *, log: Path, arch: str = "x86_64") -> Verdict:
    """What systemd-sysext on ``base`` (with the base's own image policy) would do with ``path``."""
    name = path.name.removesuffix(".raw")
    v = Verdict(path, name)
    if not path.is_file():
        raise HadronError(f"{path} does not exist")
    policy = image_policy(base)
    v.facts["image_policy"] = policy or "systemd's default (signed, verity-only and unprotected images)"
    strict = requires_signature(policy)

    def unsigned(reason: str) -> None:
        if strict:
            v.refuse(f"{reason}: the base's image policy ({policy}) accepts signed images only")
        else:
            v.facts["warning"] = (f"{reason}; the base's image policy ({v.facts['image_policy']}) lets it merge: "
                                  "set ImagePolicy=root=signed+absent:usr=signed+absent in its sysext.conf")
    parts = _partitions(path)
    with tempfile.TemporaryDirectory(prefix="hadron-sysext-verify-") as td:
        work = Path(td)
        if parts is None:
            with open(path, "rb") as f:
                f.seek(1024)
                magic = f.read(4)
            if magic == EROFS_MAGIC:
                v.facts["form"] = "bare erofs"
                unsigned("a bare erofs image has no dm-verity and no signature")
                shutil.copyfile(path, work / "data")
                _check_release(v, base, work, arch)
            else:
                v.refuse("neither a GPT disk image nor an erofs file system")
            v.accepted = not v.reasons
            return v
        roles = {}
        for p in parts:
            t = str(p["type"]).upper()
            if t in X86_64_TYPES:
                roles[X86_64_TYPES[t]] = p
            elif t in OTHER_ARCH_ROOTS:
                v.refuse(f"its partition {p['node']} is a root partition for {OTHER_ARCH_ROOTS[t]}, the base is "
                         f"{ARCHITECTURES.get(arch, arch)}")
        kind = "usr" if "usr" in roles else "root"
        if kind not in roles:
            v.refuse(f"no {ARCHITECTURES.get(arch, arch)} root or usr partition")
            return v
        _extract(path, roles[kind], work / "data")
        _check_release(v, base, work, arch)
        if f"{kind}-verity" not in roles:
            v.facts["form"] = "erofs in GPT, no verity"
            unsigned("no dm-verity hash partition")
            v.accepted = not v.reasons
            return v
        data_uuid, hash_uuid = (str(roles[k]["uuid"]).replace("-", "").lower() for k in (kind, f"{kind}-verity"))
        roothash = data_uuid + hash_uuid
        v.facts["roothash"] = roothash
        _extract(path, roles[f"{kind}-verity"], work / "hash")
        _check_verity(v, base, work, roothash, log)
        if f"{kind}-verity-sig" not in roles:
            v.facts["form"] = "verity, unsigned"
            unsigned("verity without a signature partition")
            v.accepted = not v.reasons
            return v
        v.facts["form"] = "verity, signed"
        _extract(path, roles[f"{kind}-verity-sig"], work / "sig")
        _check_signature(v, work, roothash, certs)
    v.accepted = not v.reasons
    return v


def _in_image(base: BuiltImage, work: Path, argv: list[str], name: str) -> str | None:
    """Output of one of the base's programs run on files in ``work`` (None if it failed)."""
    log = work / f"{name}.log"
    log.unlink(missing_ok=True)
    try:
        run_in_image(base.rootfs, argv, work, log, name)
    except HadronError:
        return None
    return log.read_text(errors="replace").split("\n", 1)[1]  # after run_in_image's "==>" line


def _check_release(v: Verdict, base: BuiltImage, work: Path, arch: str) -> None:
    """Read the extension-release file out of the erofs (the base's dump.erofs) and match it."""
    listing = _in_image(base, work, ["dump.erofs", "--ls", f"--path=/{RELEASE_DIR}", "/tmp/out/data"], "ls")
    found = sorted(set(re.findall(r"^\s*\d+\s+\d+\s+(extension-release\.\S+)\s*$", listing or "", re.M)))
    want_file = f"extension-release.{v.name}"
    if want_file not in found:
        v.refuse(f"no /{RELEASE_DIR}/{want_file} in the extension (its file name says it is {v.name!r})"
                 + (f"; it carries {', '.join(found)}" if found else ""))
        return
    text = _in_image(base, work, ["dump.erofs", "--cat", f"--path=/{RELEASE_DIR}/{want_file}", "/tmp/out/data"],
                     "cat") or ""
    rel = {k: val.strip().strip('"') for k, _, val in (ln.partition("=") for ln in text.splitlines() if "=" in ln)}
    v.facts["extension_release"] = rel
    want = base_release(base)
    if rel.get("ID") not in (want.get("ID"), "_any"):
        v.refuse(f"extension-release ID={rel.get('ID')!r}, the base is ID={want.get('ID')!r}")
    if want.get("SYSEXT_LEVEL") and rel.get("SYSEXT_LEVEL") and rel.get("ID") != "_any":
        if rel["SYSEXT_LEVEL"] != want["SYSEXT_LEVEL"]:
            v.refuse(f"extension-release SYSEXT_LEVEL={rel['SYSEXT_LEVEL']!r}, the base has "
                     f"SYSEXT_LEVEL={want['SYSEXT_LEVEL']!r}")
    elif rel.get("ID") != "_any" and rel.get("VERSION_ID") != want.get("VERSION_ID"):
        v.refuse(f"extension-release has neither the base's SYSEXT_LEVEL={want.get('SYSEXT_LEVEL')!r} nor its "
                 f"VERSION_ID={want.get('VERSION_ID')!r}")
    mine = ARCHITECTURES.get(arch, arch)
    if rel.get("ARCHITECTURE") and rel["ARCHITECTURE"] not in (mine, "_any"):
        v.refuse(f"extension-release ARCHITECTURE={rel['ARCHITECTURE']!r}, the base is {mine}")


def _check_verity(v: Verdict, base: BuiltImage, work: Path, roothash: str, log: Path) -> None:
    try:
        run_in_image(base.rootfs, ["veritysetup", "verify", "/tmp/out/data", "/tmp/out/hash", roothash], work, log,
                     f"veritysetup verify ({v.name})")
        v.facts["verity"] = "data matches the root hash"
    except HadronError:
        v.facts["verity"] = "corrupt"
        v.refuse(f"the data does not match its dm-verity root hash {roothash} (see {log}); it would merge, "
                 "but reading the changed blocks fails with EIO")


def _check_signature(v: Verdict, work: Path, roothash: str, certs: Sequence[Path]) -> None:
    raw = (work / "sig").read_bytes().rstrip(b"\0")
    try:
        doc = json.loads(raw)
        signed_hash, signature = str(doc["rootHash"]).lower(), base64.b64decode(doc["signature"])
    except (ValueError, KeyError, TypeError):
        v.refuse("the signature partition does not hold systemd's JSON (rootHash, signature)")
        return
    if signed_hash != roothash:
        v.refuse(f"the signature partition names root hash {signed_hash}, the partitions' is {roothash}")
    by = signature_valid(signed_hash, signature, certs, work)
    if by is None:
        v.refuse("the root hash signature is not by a certificate the base trusts ("
                 + (", ".join(str(c) for c in certs) or "none given") + ")")
    else:
        v.facts["signed_by"] = str(by)
