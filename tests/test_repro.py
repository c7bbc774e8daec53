"""hadron verify-repro: a rebuild on a varied machine is compared with the normal build."""

from __future__ import annotations

import json
from pathlib import Path

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
