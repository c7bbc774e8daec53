"""hadron verify-repro: a rebuild on a varied machine is compared with the normal build."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, cast

import pytest

from conftest import Project, add_image, add_static_hello
from synth import make_tarball

# Every property the variation changes, written into the output.
LEAKY_INSTALL = """mkdir -p "$DESTDIR/usr/share/leaky"
{ hostname; id -u; umask; date +%z; echo "$LC_ALL $LANG"; echo "jobs $JOBS"; } > "$DESTDIR/usr/share/leaky/machine"
echo steady > "$DESTDIR/usr/share/leaky/steady"
"""


def add_leaky(p: Project) -> None:
    digest = make_tarball(p.dist / "leaky-1.tar.gz", "leaky-1", {"README": "leaks the build machine\n"})
    (p.packages / "leaky.toml").write_text(
        'name = "leaky"\nversion = "1"\nsummary = "records the machine it was built on"\nlicense = "MIT"\n'
        f'homepage = "https://example.org"\n[[sources]]\nurl = "{p.url}/leaky-1.tar.gz"\nsha256 = "{digest}"\n'
        'unsigned = "a test file: no upstream signature"\n'
        f"[build]\nsystem = \"custom\"\ninstall = '''\n{LEAKY_INSTALL}'''\n[depends]\ntoolchain = false\n"
    )


def test_a_reproducible_image_is_identical_under_variation(project: Project) -> None:
    add_static_hello(project)
    add_image(project, "mini", ["hello"])
    res = project.hadron("verify-repro", "mini", "--json", "-j", "2")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["percent"] == 100.0 and doc["total"] == 2
    assert {(c["kind"], c["name"]) for c in doc["compared"]} == {("package", "hello"), ("image", "mini")}
    var = doc["variation"]
    assert var["jobs"] == "2 -> 1" and var["hostname"] == "hadron-build -> repro-variant"
    assert var["umask"] == "0022 -> 0002" and var["uid"] == "0 -> 1000"
    assert var["TZ"].endswith("-> <+14>-14") and var["LC_ALL"].endswith("-> C.UTF-8")


def test_an_output_that_records_the_machine_differs_and_diffoscope_says_where(project: Project) -> None:
    add_static_hello(project)
    add_leaky(project)
    res = project.hadron("verify-repro", "leaky", "hello", "--json", "-j", "2")
    assert res.returncode == 1, res.stderr
    doc = json.loads(res.stdout)
    by = {c["name"]: c for c in doc["compared"]}
    assert by["hello"]["identical"] and not by["leaky"]["identical"]
    assert doc["identical"] == 1 and doc["total"] == 2 and doc["percent"] == 50.0
    diff = by["leaky"]["diff"]
    assert "usr/share/leaky/machine" in diff and "repro-variant" in diff and "hadron-build" in diff
    assert "steady" not in diff
    report = Path(by["leaky"]["report"]).read_text()
    assert "+1400" in report and "C.UTF-8" in report
    # The normal build is untouched by the rebuild: building again is a no-op on the same outputs.
    again = project.hadron("build", "leaky", "--json", check=True)
    assert json.loads(again.stdout)["packages"]["leaky"]["status"] == "cached"


@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="needs sfdisk (fdisk)")
def test_boot_artifacts_are_made_from_both_builds_and_a_difference_is_located(
        project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
    """The artifact stage, with the UKI and disk builders replaced (a synthetic image has no kernel):
    one artifact is steady, the other's root partition records the umask and time zone it was made
    with, so only the second differs, and by partition."""
    from hadron.boot import artifacts, disk
    from hadron.config import load_settings
    from hadron.context import Context
    from hadron.trust import repro

    add_static_hello(project)
    add_image(project, "mini", ["hello"], 'boot = ["trusted"]\n')
    calls: list[tuple[str, Path]] = []

    def fake_make_all(img: Any, boot: list[str], keys: Any, out_dir: Path, *, epoch: int) -> list[artifacts.Artifact]:
        calls.append((img.name, out_dir))
        out_dir.mkdir(parents=True, exist_ok=True)
        steady = out_dir / "mini.efi"
        steady.write_bytes(b"MZ" + bytes(4096))
        mask = os.umask(0)
        os.umask(mask)
        root = out_dir / "root.img"
        root.write_bytes(f"{time.strftime('%z')} {mask:04o}".encode().ljust(disk.MIB, b"\0"))
        raw = out_dir / "mini-trusted.raw"
        disk.make_gpt_disk(raw, [disk.Partition("root", disk.ROOT_X86_64_TYPE, disk.stable_uuid("t", "root"), 1, root)],
                           disk_uuid=disk.stable_uuid("t", "disk"))
        return [artifacts.Artifact(steady.name, "uki", steady), artifacts.Artifact(raw.name, "disk", raw)]

    monkeypatch.setattr(artifacts, "make_all", fake_make_all)
    monkeypatch.setenv("HADRON_MIRRORS", "")
    monkeypatch.setenv("TZ", "UTC")
    ctx = Context(load_settings(project=project.root, cache_dir=project.cache, jobs=2))
    with ctx.layout.work_dir("repro") as work:
        rep = repro.verify_repro(ctx, ["mini"], work=work, keys=cast(Any, object()))
    assert [name for name, _ in calls] == ["mini", "mini"] and calls[0][1] != calls[1][1]
    by = {c.name: c for c in rep.compared}
    assert by["mini.efi"].kind == "uki" and by["mini.efi"].identical
    raw = by["mini-trusted.raw"]
    assert raw.kind == "disk" and not raw.identical
    assert raw.diff == f"partition 1 (type {disk.ROOT_X86_64_TYPE}, uuid {disk.stable_uuid('t', 'root').upper()}): " \
                       "contents differ"
    assert Path(raw.report).read_text().strip() == raw.diff
    assert [(c.kind, c.name) for c in rep.compared] == [("package", "hello"), ("image", "mini"), ("uki", "mini.efi"),
                                                        ("disk", "mini-trusted.raw")]
    assert rep.identical == 3
    assert os.environ["TZ"] == "UTC"
