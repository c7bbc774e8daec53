"""System extensions without a VM or a built image: the staged tree and its extension-release file,
names, the signature check against trusted certificates (openssl), the tampering helpers on a real
GPT file, and how the VM matrix's lines are read."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from hadron.errors import HadronError
from hadron.image.build import BuiltImage
from hadron.lifecycle import sysext, sysext_check


def test_stage_tree_takes_usr_and_opt_and_writes_the_release_file(tmp_path: Path) -> None:
    src = sysext_check.write_payload(tmp_path / "payload")
    (src / "opt/x").mkdir(parents=True)
    tree = tmp_path / "tree"
    sysext.stage_tree([src], tree, "hello", {"ID": "hadron", "SYSEXT_LEVEL": "1", "ARCHITECTURE": "x86-64"})
    assert (tree / "usr/bin/hadron-hello").stat().st_mode & 0o111
    assert (tree / "opt/x").is_dir()
    rel = (tree / sysext.RELEASE_DIR / "extension-release.hello").read_text()
    assert rel == "ID=hadron\nSYSEXT_LEVEL=1\nARCHITECTURE=x86-64\n"


def test_stage_tree_refuses_files_outside_usr_and_opt(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    with pytest.raises(HadronError, match="has /etc") as e:
        sysext.stage_tree([src], tmp_path / "tree", "x", {})
    assert "only /usr and /opt" in (e.value.hint or "")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HadronError, match="would be empty"):
        sysext.stage_tree([tmp_path / "empty"], tmp_path / "tree2", "x", {})


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "-x", "a b"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(HadronError, match="not usable"):
        sysext.check_name(bad)


def _key(tmp_path: Path, name: str) -> tuple[Path, Path]:
    return sysext_check.new_key(tmp_path, name)


def _sign(key: Path, crt: Path, text: str, tmp_path: Path) -> bytes:
    (tmp_path / "c.txt").write_text(text)
    subprocess.run(["openssl", "smime", "-sign", "-binary", "-noattr", "-in", tmp_path / "c.txt", "-signer", crt,
                    "-inkey", key, "-outform", "DER", "-out", tmp_path / "s.p7s"], check=True)
    return (tmp_path / "s.p7s").read_bytes()


def test_signature_is_checked_against_the_trusted_certificates_only(tmp_path: Path) -> None:
    good_key, good_crt = _key(tmp_path, "good")
    rogue_key, rogue_crt = _key(tmp_path, "rogue")
    h = "ab" * 32
    sig = _sign(good_key, good_crt, h, tmp_path)
    assert sysext.signature_valid(h, sig, [rogue_crt, good_crt], tmp_path) == good_crt
    assert sysext.signature_valid(h, sig, [rogue_crt], tmp_path) is None
    assert sysext.signature_valid("cd" * 32, sig, [good_crt], tmp_path) is None
    # a signature carrying its own certificate is not trusted for carrying it
    assert sysext.signature_valid(h, _sign(rogue_key, rogue_crt, h, tmp_path), [good_crt], tmp_path) is None


def _gpt_with(tmp_path: Path, role: str, content: bytes) -> Path:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(4 << 20))
    guid = next(g for g, r in sysext.X86_64_TYPES.items() if r == role)
    subprocess.run(["sfdisk", "-q", disk], input=f"label: gpt\nstart=2048, size=4096, type={guid}\n", text=True,
                   check=True)
    with open(disk, "r+b") as f:
        f.seek(2048 * 512)
        f.write(content)
    return disk


def test_change_signed_roothash_keeps_the_json_valid(tmp_path: Path) -> None:
    doc = {"rootHash": "ab" * 32, "signature": base64.b64encode(b"sig").decode()}
    disk = _gpt_with(tmp_path, "root-verity-sig", json.dumps(doc).encode())
    sysext_check.change_signed_roothash(disk)
    with open(disk, "rb") as f:
        f.seek(2048 * 512)
        new = json.loads(f.read(4096 * 512).rstrip(b"\0"))
    assert new["rootHash"] != doc["rootHash"] and new["rootHash"][:-1] == doc["rootHash"][:-1]
    assert new["signature"] == doc["signature"]


def test_flip_data_byte_lands_in_the_payload(tmp_path: Path) -> None:
    blocks = sysext_check.MARKER * 8192
    disk = _gpt_with(tmp_path, "root", bytes(8192) + blocks)
    sysext_check.flip_data_byte(disk)
    with open(disk, "rb") as f:
        f.seek(2048 * 512 + 8192)
        got = f.read(len(blocks))
    assert sum(a != b for a, b in zip(got, blocks, strict=True)) == 1


def test_matrix_lines_are_classified() -> None:
    hello = sysext_check.HELLO
    line = f"signed-db-key|merged=yes|run={hello}|read=ok|msg=Using extensions 'hadron-hello'."
    assert sysext_check.parse_line(line)[0] == "signed-db-key"
    assert sysext_check.classify(sysext_check.parse_line(line)[1]) == "merges"
    eio = f"x|merged=yes|run={hello}|read=cat: read error: I/O error|msg="
    assert sysext_check.classify(sysext_check.parse_line(eio)[1]) == "eio"
    refused = "x|merged=no|run=|read=|msg=Image policy violated"
    assert sysext_check.classify(sysext_check.parse_line(refused)[1]) == "refused"
    assert sysext_check.classify(sysext_check.parse_line("x|merged=yes|run=sh: not found|read=|msg=")[1]) == "other"
    assert set(sysext_check.EXPECTED.values()) == {"merges", "eio", "refused"}


def test_matrix_probe_is_valid_shell() -> None:
    assert subprocess.run(["sh", "-n", "-c", sysext_check.PROBE]).returncode == 0


def test_a_variant_is_right_only_when_vm_and_verify_agree() -> None:
    ok = sysext_check.VariantResult("signed-db-key", "merges", "merges", "", True, [])
    assert ok.ok
    assert not sysext_check.VariantResult("signed-db-key", "merges", "merges", "", False, ["x"]).ok
    assert not sysext_check.VariantResult("bare-erofs", "refused", "merges", "", False, ["x"]).ok
    assert sysext_check.VariantResult("data-byte-flipped", "eio", "eio", "", False, ["corrupt"]).ok


def _base(tmp_path: Path, files: dict[str, str]) -> BuiltImage:
    for rel, text in files.items():
        (tmp_path / "rootfs" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "rootfs" / rel).write_text(text)
    return BuiltImage("base", "k", tmp_path, {}, True)


def test_the_base_image_policy_is_read_from_sysext_conf_and_its_drop_ins(tmp_path: Path) -> None:
    assert sysext.image_policy(_base(tmp_path / "none", {})) is None
    base = _base(tmp_path / "b", {
        "usr/lib/systemd/sysext.conf": "[SysExt]\nImagePolicy=root=verity+signed:usr=verity+signed\n",
        "usr/lib/systemd/sysext.conf.d/10-a.conf": "[SysExt]\nImagePolicy=root=signed+absent:usr=signed+absent\n",
        "usr/lib/systemd/sysext.conf.d/20-b.conf": "[ConfExt]\nImagePolicy=root=unprotected\n",
    })
    assert sysext.image_policy(base) == "root=signed+absent:usr=signed+absent"
    # a drop-in of the same name in /etc hides the vendor one
    (tmp_path / "b/rootfs/etc/systemd/sysext.conf.d").mkdir(parents=True)
    (tmp_path / "b/rootfs/etc/systemd/sysext.conf.d/10-a.conf").write_text("[SysExt]\nImagePolicy=root=verity\n")
    assert sysext.image_policy(base) == "root=verity"
    (tmp_path / "b/rootfs/etc/systemd/sysext.conf.d/10-a.conf").write_text("# nothing\n")
    assert sysext.image_policy(base) == "root=verity+signed:usr=verity+signed"


@pytest.mark.parametrize(("policy", "strict"), [
    ("root=signed+absent:usr=signed+absent", True), ("root=signed:usr=signed", True),
    ("root=verity+signed+absent:usr=signed+absent", False), ("root=signed+absent", False), (None, False)])
def test_only_a_policy_without_unsigned_images_requires_signatures(policy: str | None, strict: bool) -> None:
    assert sysext.requires_signature(policy) is strict


def test_core_requires_signed_extensions(tmp_path: Path) -> None:
    files = Path(__file__).resolve().parents[1] / "distro/images/core/files"
    conf = {str(p.relative_to(files)): p.read_text() for p in (files / "usr/lib/systemd/sysext.conf.d").glob("*.conf")}
    assert sysext.requires_signature(sysext.image_policy(_base(tmp_path, conf)))
