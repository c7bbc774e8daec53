"""The kbuild helper on a miniature kernel-style tree: ARCH is passed, fragments are merged on top of
the base config, and a fragment symbol that does not survive ``olddefconfig`` fails the build."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import Project
from synth import make_tarball

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

# A Makefile with kbuild's calling convention (-C src O=dir target), whose "kconfig" knows three
# symbols: 64BIT follows ARCH, FOO is free, BAR needs FOO (olddefconfig drops it otherwise).
MAKEFILE = """\
O ?= .
tinyconfig:
\t@mkdir -p $(O)
\t@if [ "$(ARCH)" = x86_64 ]; then echo CONFIG_64BIT=y; else echo '# CONFIG_64BIT is not set'; fi > $(O)/.config
\t@echo '# CONFIG_FOO is not set' >> $(O)/.config
olddefconfig:
\t@grep -q '^CONFIG_FOO=y' $(O)/.config || sed -i '/^CONFIG_BAR=/d' $(O)/.config
bzImage:
\t@mkdir -p $(O)/arch/x86/boot && echo kernel > $(O)/arch/x86/boot/bzImage
"""

MERGE = """\
#!/bin/sh
# merge_config.sh -m -O DIR BASE FRAGMENT...: later assignments win
set -e
shift; shift; out=$1; shift; base=$1; shift
cat "$base" "$@" | awk -F'[= ]' '/^CONFIG_/{k=$1} /^# CONFIG_/{k=$2} k{v[k]=$0; if(!(k in o)){o[k]=++n; ks[n]=k}} {k=""}
  END{for(i=1;i<=n;i++) print v[ks[i]]}' > "$out/.config.new"
mv "$out/.config.new" "$out/.config"
"""

RECIPE = """\
name = "minikernel"
version = "1.0"
summary = "kernel-style tree"
license = "MIT"
homepage = "https://example.org/minikernel"

[[sources]]
url = "{url}"
sha256 = "{sha}"
unsigned = "a test kernel: no upstream signature"

[build]
system = "kbuild"
base_config = "tinyconfig"
fragments = ["flavor.config"]
targets = ["bzImage"]
install = '''
install -Dm644 /build/_b/arch/x86/boot/bzImage "$DESTDIR/boot/vmlinuz"
install -Dm644 /build/_b/.config "$DESTDIR/boot/config"
echo "$ARCH" > "$DESTDIR/boot/arch"
'''

[depends]
toolchain = false
"""


def add_minikernel(p: Project, fragment: str) -> Path:
    sha = make_tarball(p.dist / "minikernel-1.0.tar.gz", "minikernel-1.0",
                       {"Makefile": MAKEFILE, "scripts/kconfig/merge_config.sh": MERGE},
                       {"scripts/kconfig/merge_config.sh": 0o755})
    d = p.packages / "minikernel"
    d.mkdir(parents=True, exist_ok=True)
    (d / "recipe.toml").write_text(RECIPE.format(url=f"{p.url}/minikernel-1.0.tar.gz", sha=sha))
    (d / "flavor.config").write_text(fragment)
    return d


def test_kbuild_passes_arch_and_merges_fragments(project: Project) -> None:
    add_minikernel(project, "CONFIG_FOO=y\nCONFIG_BAR=y\n")
    res = project.hadron("build", "--json", "minikernel", check=True)
    out = Path(json.loads(res.stdout)["packages"]["minikernel"]["output"]) / "runtime" / "boot"
    config = (out / "config").read_text().splitlines()
    assert "CONFIG_64BIT=y" in config  # ARCH=x86_64 reached kconfig
    assert {"CONFIG_FOO=y", "CONFIG_BAR=y"} <= set(config)
    assert (out / "arch").read_text().strip() == "x86_64"


def test_kbuild_fragment_symbol_that_does_not_survive_fails(project: Project) -> None:
    add_minikernel(project, "# needs FOO, which stays off\nCONFIG_BAR=y\n")
    res = project.hadron("build", "minikernel")
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "flavor.config:2: CONFIG_BAR=y requested, final .config has CONFIG_BAR=n" in text
