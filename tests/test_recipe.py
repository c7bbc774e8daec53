from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hadron.engine.recipe import load_recipes, parse_recipe
from hadron.errors import RecipeError

GOOD = '''
name = "zlib"
version = "1.3.2"
summary = "compression library"
license = "Zlib"
homepage = "https://zlib.net/"

[[sources]]
url = "https://zlib.net/zlib-1.3.2.tar.gz"
unsigned = "a test recipe: no upstream signature"
[[sources.alternatives]]
provider = "debian"
package = "zlib"
file = "zlib_1.3.2.orig.tar.gz"
sha256 = "7b6903eb019983987b7112eccf90f1703f1c6c0e0cede36564bf611d19ca579d"
note = "Debian repack"

[build]
system = "autotools"
configure_args = ["--shared"]

[depends]
build = []
'''


def write(tmp_path: Path, text: str, name: str = "zlib") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return p


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RecipeError) as ei:
        parse_recipe(write(tmp_path, text), expect_name="zlib")
    return ei.value.problems


def test_good_recipe_parses(tmp_path: Path) -> None:
    r = parse_recipe(write(tmp_path, GOOD), expect_name="zlib")
    assert r.recipe.build.system == "autotools"
    assert r.recipe.sources[0].digests() == ["7b6903eb019983987b7112eccf90f1703f1c6c0e0cede36564bf611d19ca579d"]
    assert len(r.digest()) == 64


def test_unknown_key_is_reported_with_file_and_field(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD + '\n[outputs]\nbogus = 1\n')
    assert p == [f"{tmp_path / 'zlib.toml'}: outputs.bogus: unknown field"]


def test_wrong_type(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD.replace('configure_args = ["--shared"]', 'configure_args = "--shared"'))
    assert len(p) == 1 and ": build.configure_args: " in p[0] and "list" in p[0]


def test_missing_field(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD.replace('license = "Zlib"\n', ""))
    assert p == [f"{tmp_path / 'zlib.toml'}: license: required field is missing"]


def test_unknown_build_system(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD.replace('system = "autotools"', 'system = "scons"'))
    assert "build: unknown build system" in p[0]


def test_shell_not_allowed_in_standard_build_systems(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD.replace('system = "autotools"', 'system = "autotools"\ninstall = "rm -rf /"'))
    assert p[0].endswith("build.install: unknown field")


@pytest.mark.parametrize("where", ["top", "source", "build"])
def test_patches_are_a_schema_error(tmp_path: Path, where: str) -> None:
    text = {
        "top": GOOD.replace('license = "Zlib"', 'license = "Zlib"\npatches = ["fix.patch"]'),
        "source": GOOD.replace('url = "https://zlib.net/', 'patches = ["a.diff"]\nurl = "https://zlib.net/'),
        "build": GOOD.replace('system = "autotools"', 'system = "autotools"\npatches = []'),
    }[where]
    p = problems(tmp_path, text)
    assert len(p) == 1 and "recipes cannot carry patches" in p[0]


def test_bad_digest_and_license(tmp_path: Path) -> None:
    text = GOOD.replace('license = "Zlib"', 'license = "zlib license v1!"').replace("7b6903eb", "XYZ")
    p = problems(tmp_path, text)
    assert any(": license: " in x and "SPDX" in x for x in p)
    assert any("sources[0].alternatives[0].sha256" in x for x in p)


def test_repack_needs_note(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD.replace('note = "Debian repack"', ""))
    assert "needs a `note`" in p[0]


def test_name_must_match_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as ei:
        parse_recipe(write(tmp_path, GOOD, name="other"), expect_name="other")
    assert "does not match the file name" in ei.value.problems[0]


def test_toml_syntax_error(tmp_path: Path) -> None:
    p = problems(tmp_path, "name = \n")
    assert "(syntax)" in p[0]


def test_unknown_dependency_and_override(tmp_path: Path) -> None:
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "zlib.toml").write_text(GOOD.replace("build = []", 'build = ["nope"]'))
    with pytest.raises(RecipeError) as ei:
        load_recipes([a])
    assert ei.value.problems == [f"{a / 'zlib.toml'}: depends.build[0]: no recipe named 'nope'"]
    # An extra directory overrides a recipe of the same name.
    (b / "zlib.toml").write_text(GOOD.replace('version = "1.3.2"', 'version = "9"'))
    assert load_recipes([a, b])["zlib"].recipe.version == "9"


def test_folder_recipe_files_are_part_of_the_digest(tmp_path: Path) -> None:
    d = tmp_path / "zlib"
    d.mkdir()
    (d / "recipe.toml").write_text(GOOD)
    (d / "extra.conf").write_text("A=1\n")
    one = load_recipes([tmp_path])["zlib"].digest()
    (d / "extra.conf").write_text("A=2\n")
    assert load_recipes([tmp_path])["zlib"].digest() != one


# Malformed input never produces anything but a RecipeError.
toml_scalars = st.one_of(
    st.integers(), st.booleans(), st.text(string.printable, max_size=12), st.floats(allow_nan=False)
)
keys = st.sampled_from(
    ["name", "version", "summary", "license", "homepage", "sources", "build", "depends", "outputs", "check",
     "system", "url", "sha256", "options", "patches", "alternatives", "configure_args", "x"]
)
values = st.recursive(
    toml_scalars,
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=4)),
    max_leaves=12,
)


def dump(d: dict[str, object]) -> str:
    import json

    # TOML inline tables/arrays are close enough to JSON for these shapes; emit key = value lines.
    def val(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {val(x)}" for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, str):
            return json.dumps(v)
        return repr(v)

    return "\n".join(f"{json.dumps(k)} = {val(v)}" for k, v in d.items()) + "\n"


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=8))
def test_malformed_recipes_never_crash(tmp_path_factory: pytest.TempPathFactory, data: dict[str, object]) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    p = tmp / "zlib.toml"
    p.write_text(dump(data))
    try:
        parse_recipe(p, expect_name="zlib")
    except RecipeError as e:
        assert e.problems and all(x.startswith(str(p) + ": ") for x in e.problems)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_never_crash(tmp_path_factory: pytest.TempPathFactory, blob: bytes) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "zlib.toml"
    p.write_bytes(blob)
    with pytest.raises(RecipeError):
        parse_recipe(p, expect_name="zlib")


def test_bootstrap_runs_before_configure_in_the_writable_tree(tmp_path: Path) -> None:
    from hadron.engine import buildsys

    text = GOOD.replace('configure_args = ["--shared"]', 'in_tree = true\nbootstrap = "autoreconf -fi"\n'
                        'configure_args = ["--shared"]')
    r = parse_recipe(write(tmp_path, text), expect_name="zlib").recipe
    names = [p.name for p in buildsys.phases(r)]
    assert names[:2] == ["bootstrap", "configure"]
    assert 'cd "$SRCDIR"\nautoreconf -fi' in buildsys.phases(r)[0].script
    # a bootstrap changes the cache key's steps
    plain = parse_recipe(write(tmp_path, GOOD.replace('configure_args', 'in_tree = true\nconfigure_args')),
                         expect_name="zlib").recipe
    assert buildsys.steps_digest(r) != buildsys.steps_digest(plain)


def test_bootstrap_needs_a_writable_tree(tmp_path: Path) -> None:
    p = problems(tmp_path, GOOD.replace('configure_args = ["--shared"]', 'bootstrap = "autoreconf -fi"'))
    assert len(p) == 1 and "in_tree = true" in p[0]


def test_a_folder_edited_after_planning_is_refused_not_built(tmp_path: Path) -> None:
    """The build reads a snapshot of the recipe folder taken when it starts; a folder that no longer
    matches the digest its cache key was computed from fails the build instead of being stored under
    the old key (an edit to a kernel fragment during a long build did exactly that)."""
    from types import SimpleNamespace

    from hadron.engine.executor import snapshot_folder
    from hadron.errors import HadronError

    folder = tmp_path / "zlib"
    folder.mkdir()
    (folder / "recipe.toml").write_text(GOOD)
    (folder / "extra.config").write_text("CONFIG_A=y\n")
    loaded = parse_recipe(folder / "recipe.toml", expect_name="zlib")
    req = SimpleNamespace(name="zlib", recipe=loaded)
    snap = snapshot_folder(req, tmp_path / "snap1")  # type: ignore[arg-type]
    assert (snap / "extra.config").read_text() == "CONFIG_A=y\n"
    (folder / "extra.config").write_text("CONFIG_A=n\n")
    with pytest.raises(HadronError, match="changed after the build was planned"):
        snapshot_folder(req, tmp_path / "snap2")  # type: ignore[arg-type]
