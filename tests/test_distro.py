"""The distribution definition itself (distro/): every recipe, image and toolchain profile loads, each
profile's graph is acyclic, and what an image ships is compiled by the profile's compiler."""

from __future__ import annotations

from pathlib import Path

import pytest

from hadron.engine.graph import Graph
from hadron.engine.recipe import load_recipes
from hadron.engine.toolchain import load_toolchain
from hadron.image.definition import image_files, load_image

ROOT = Path(__file__).resolve().parent.parent
RECIPES = load_recipes([ROOT / "distro" / "packages"])
_FOUND = image_files(ROOT / "distro" / "images")
IMAGES = {n: load_image(p, _FOUND) for n, p in _FOUND.items()}
PROFILES = sorted(p.stem for p in (ROOT / "distro" / "toolchains").glob("*.toml"))


def shipped(graph: Graph, image: str) -> list[str]:
    """Packages whose runtime output lands in the image: its packages, their run closure, the kernel."""
    spec = IMAGES[image].spec
    todo = [*spec.packages, *([spec.kernel] if spec.kernel else [])]
    seen: list[str] = []
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.append(n)
            todo += graph.run_deps(n)
    return sorted(seen)


def test_profiles_and_images_exist() -> None:
    assert {"cross", "host"} <= set(PROFILES)
    assert "core" in IMAGES


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_image_closure_is_acyclic_and_built_by_the_profile(profile: str, image: str) -> None:
    tc = load_toolchain(ROOT, profile)
    g = Graph(RECIPES, tc.packages)
    spec = IMAGES[image].spec
    order = g.closure([*spec.packages, *([spec.kernel] if spec.kernel else [])])
    assert set(tc.packages) <= set(order)
    # Nothing an image ships may come from the build machine's compiler behind the profile's back.
    not_by_profile = [n for n in shipped(g, image) if not RECIPES[n].recipe.depends.toolchain]
    assert not_by_profile == []
    # The C library is compiled by the profile's compiler and is what every target package sees.
    assert "musl" in tc.packages
    assert set(tc.packages) - {"musl"} <= set(g.build_deps("musl"))
    assert "musl" in g.transitive_build_inputs("busybox")


def test_cross_toolchain_is_bootstrapped_from_its_own_libc() -> None:
    g = Graph(RECIPES, load_toolchain(ROOT, "cross").packages)
    gcc = g.transitive_build_inputs("gcc-cross")
    assert "musl-boot" in gcc and "musl" not in gcc
    assert "musl-boot" not in g.transitive_build_inputs("systemd")


def test_core_carries_the_security_user_space_and_children_keep_its_replacements() -> None:
    g = Graph(RECIPES, load_toolchain(ROOT, "host").packages)
    core = shipped(g, "core")
    # what systemd's TPM2, dm-verity, repart and sysupdate tools load, and what repart and fsck run
    assert {"openssl", "tpm2-tss", "cryptsetup", "device-mapper", "curl", "e2fsprogs", "erofs-utils"} <= set(core)
    assert IMAGES["core"].spec.replaces == {"e2fsprogs": ["busybox"]}
    # an image that extends core adds its own replacements to core's
    assert IMAGES["core-grub"].spec.replaces == {"e2fsprogs": ["busybox"], "coreutils": ["busybox"]}


def test_pinned_signing_keys_are_in_the_repository_one_certificate_per_file(tmp_path: Path) -> None:
    """Every fingerprint a recipe pins has ``distro/keys/<FPR>.asc`` holding exactly that certificate,
    and every key file there is pinned by some recipe."""
    import subprocess

    keys_dir = ROOT / "distro" / "keys"
    pinned = {k for r in RECIPES.values() for s in r.recipe.sources if s.signature for k in s.signature.keys}
    assert pinned, "no recipe pins an upstream signing key"
    assert all(r.keys_dir == keys_dir for r in RECIPES.values())
    files = {p.stem for p in keys_dir.glob("*.asc")}
    assert files == pinned, f"unpinned key files: {files - pinned}; pinned without a file: {pinned - files}"
    for fpr in sorted(files):
        cols = subprocess.run(["gpg", "--homedir", tmp_path, "--show-keys", "--with-colons",
                               keys_dir / f"{fpr}.asc"], check=True, capture_output=True, text=True).stdout.splitlines()
        primaries = [cols[i + 1].split(":")[9] for i, line in enumerate(cols) if line.startswith("pub:")]
        assert primaries == [fpr], f"{fpr}.asc holds {primaries}"

