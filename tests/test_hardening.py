"""The ELF hardening audit: each check catches its violation in a program compiled here, a clean
program passes, and image assembly fails on a violation unless the allow-list excuses it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Project, add_image, add_static_hello
from hadron.image import hardening as h
from synth import make_tarball

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")

# A buffer filled from outside: -fstack-protector-strong instruments main.
PROG_C = r"""
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    char buf[64];
    strncpy(buf, argc > 1 ? argv[1] : "hardened", sizeof buf - 1);
    buf[sizeof buf - 1] = 0;
    puts(buf);
    return 0;
}
"""
HARD = ["-O2", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-fPIE", "-pie", "-Wl,-z,relro,-z,now"]
FORTIFIED = h.fortify_from_flags("test", ["-O2", "-D_FORTIFY_SOURCE=2"])


def compile_into(root: Path, rel: str, flags: list[str], source: str = PROG_C, name: str = "prog.c") -> Path:
    src = root.parent / name
    src.write_text(source)
    out = root / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["gcc", *flags, "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def audit_one(tmp_path: Path, flags: list[str], rel: str = "usr/bin/prog") -> h.FileAudit:
    root = tmp_path / "rootfs"
    compile_into(root, rel, flags)
    audit = h.audit_tree(root, "x86_64", FORTIFIED, [])
    (fa,) = [f for f in audit.files if f.path == rel]
    return fa


def failed(fa: h.FileAudit) -> set[str]:
    return {c for c, v in fa.results.items() if v == h.FAIL}


def test_a_hardened_program_passes_every_check(tmp_path: Path) -> None:
    fa = audit_one(tmp_path, HARD)
    assert fa.kind == "pie"
    assert {c: fa.results[c] for c in h.CHECKS} == dict.fromkeys(h.CHECKS, h.OK)


@pytest.mark.parametrize(("extra", "check"), [
    (["-no-pie", "-fno-PIE"], "pie"),
    (["-Wl,-z,execstack"], "nx"),
    (["-Wl,-z,norelro"], "relro"),
    (["-Wl,-z,lazy"], "bind-now"),
    (["-fno-stack-protector"], "canary"),
    (["-Wl,-rpath,/opt/x/lib"], "rpath"),
    (["-Wl,-rpath,$ORIGIN/../../opt"], "rpath"),
])
def test_each_check_catches_its_violation(tmp_path: Path, extra: list[str], check: str) -> None:
    fa = audit_one(tmp_path, [*HARD, *extra])
    assert failed(fa) == {check}, fa.details
    assert fa.details[check]


def test_runpath_inside_the_library_dirs_is_fine(tmp_path: Path) -> None:
    fa = audit_one(tmp_path, [*HARD, "-Wl,-rpath,$ORIGIN/../lib/systemd:/usr/lib/x"])
    assert fa.results["rpath"] == h.OK


def test_stripped_program_keeps_its_canary_and_a_library_is_not_a_pie(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    prog = compile_into(root, "usr/bin/prog", HARD)
    subprocess.run(["strip", "--strip-unneeded", str(prog)], check=True)
    lib = compile_into(root, "usr/lib/libx.so.1", ["-O2", "-fstack-protector-strong", "-fPIC", "-shared",
                                                    "-Wl,-z,relro,-z,now"],
                       "#include <string.h>\nint f(const char *s) { char b[32]; strcpy(b, s); return b[3]; }\n",
                       "lib.c")
    subprocess.run(["strip", "--strip-unneeded", str(lib)], check=True)
    audit = h.audit_tree(root, "x86_64", FORTIFIED, [])
    by = {f.path: f for f in audit.files}
    assert by["usr/bin/prog"].results["canary"] == h.OK
    assert by["usr/lib/libx.so.1"].kind == "shared" and by["usr/lib/libx.so.1"].results["pie"] == h.NA
    assert not failed(by["usr/lib/libx.so.1"])


def test_text_relocations_are_caught(tmp_path: Path) -> None:
    # An absolute address in .text of a shared object: the loader must write into the code.
    src = ('int g;\n__asm__(".text\\n.globl f\\n.type f,@function\\nf: movabs $g, %rax\\nret\\n");\n'
           "int h(const char *s) { char b[16]; __builtin_strcpy(b, s); return b[1]; }\n")
    root = tmp_path / "rootfs"
    compile_into(root, "usr/lib/libt.so", ["-O2", "-fstack-protector-strong", "-fPIC", "-shared",
                                            "-Wl,-z,relro,-z,now", "-Wl,-z,notext"], src, "t.c")
    (fa,) = h.audit_tree(root, "x86_64", FORTIFIED, []).files
    assert failed(fa) == {"textrel"}


def test_relocatable_objects_are_not_audited_and_other_machines_fail_as_arch(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    (tmp_path / "m.c").write_text("int x(void) { return 1; }\n")
    (root / "usr/lib/modules").mkdir(parents=True)
    subprocess.run(["gcc", "-c", "-o", str(root / "usr/lib/modules/m.ko"), str(tmp_path / "m.c")], check=True)
    prog = compile_into(root, "usr/lib/grub/other.img", HARD)
    data = bytearray(prog.read_bytes())
    data[18:20] = (183).to_bytes(2, "little")  # e_machine: EM_AARCH64
    prog.write_bytes(bytes(data))
    (root / "usr/share").mkdir(parents=True)
    (root / "usr/share/not-elf").write_bytes(b"\x7fELX nothing")
    by = {f.path: f for f in h.audit_tree(root, "x86_64", FORTIFIED, []).files}
    assert set(by) == {"usr/lib/modules/m.ko", "usr/lib/grub/other.img"}
    assert by["usr/lib/modules/m.ko"].kind == "relocatable" and not by["usr/lib/modules/m.ko"].results
    assert by["usr/lib/grub/other.img"].kind == "foreign" and failed(by["usr/lib/grub/other.img"]) == {"arch"}


def test_fortify_is_asserted_from_the_profile_flags() -> None:
    assert h.fortify_from_flags("p", ["-O2", "-D_FORTIFY_SOURCE=2"]).asserted
    assert h.fortify_from_flags("p", ["-Os", "-D_FORTIFY_SOURCE=3"]).asserted
    assert "no fortified functions" in h.fortify_from_flags("p", ["-O2", "-D_FORTIFY_SOURCE=2"]).detail
    for flags in (["-O2"], ["-O2", "-D_FORTIFY_SOURCE=1"], ["-O2", "-D_FORTIFY_SOURCE"],
                  ["-D_FORTIFY_SOURCE=2"], ["-O2", "-D_FORTIFY_SOURCE=2", "-O0"],
                  ["-O2", "-D_FORTIFY_SOURCE=2", "-U_FORTIFY_SOURCE"]):
        f = h.fortify_from_flags("p", flags)
        assert not f.asserted and "profile 'p'" in f.detail, flags


def test_allow_list_excuses_named_checks_and_unused_entries_are_reported(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    compile_into(root, "usr/bin/lazy", [*HARD, "-Wl,-z,lazy", "-fno-stack-protector"])
    allow = [h.AllowEntry("/usr/bin/la*", ("bind-now",), "test: lazy on purpose"),
             h.AllowEntry("/usr/bin/*", ("canary", "nx"), "test: no arrays"),
             h.AllowEntry("/usr/sbin/*", ("pie",), "test: stale")]
    audit = h.audit_tree(root, "x86_64", FORTIFIED, allow)
    (fa,) = audit.files
    assert fa.results["bind-now"] == h.ALLOWED and fa.results["canary"] == h.ALLOWED
    assert not audit.violations
    assert audit.unused == ["/usr/bin/*: checks nx excuse no file", "/usr/sbin/* (pie): excuses no file"]
    record = audit.record(allow)
    assert record["files"][0]["allowed"] == {"bind-now": "test: lazy on purpose", "canary": "test: no arrays"}
    text = "\n".join(h.table(record))
    assert "/usr/bin/lazy" in text and "allowed: /usr/bin/* (canary, nx): test: no arrays" in text


# Image assembly through the CLI, with a profile that declares flags (and so is audited).
PROFILE = """name = "hard"
summary = "the build machine's gcc with hardening flags"
[flags]
cflags = ["-O2", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2"]
ldflags = ["-Wl,-z,relro", "-Wl,-z,now"]
"""


def add_hardened_prog(p: Project) -> None:
    digest = make_tarball(p.dist / "prog-1.tar.gz", "prog-1", {"prog.c": PROG_C})
    (p.packages / "prog.toml").write_text(
        f'name = "prog"\nversion = "1"\nsummary = "hardened program"\nlicense = "MIT"\n'
        f'homepage = "https://example.org"\n[[sources]]\nurl = "{p.url}/prog-1.tar.gz"\nsha256 = "{digest}"\n'
        'unsigned = "a test file: no upstream signature"\n'
        '[build]\nsystem = "custom"\nbuild = "cc $CFLAGS $LDFLAGS -o prog /src/prog.c"\n'
        "install = 'install -Dm755 prog \"$DESTDIR/usr/bin/prog\"'\n[depends]\ntoolchain = true\n")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_a_violation_fails_the_image_unless_allowed(project: Project) -> None:
    (project.root / "distro" / "toolchains").mkdir(parents=True)
    (project.root / "distro" / "toolchains" / "hard.toml").write_text(PROFILE)
    add_hardened_prog(project)
    add_image(project, "clean", ["prog"])
    res = project.hadron("build", "clean", "--toolchain", "hard", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads((Path(json.loads(res.stdout)["images"]["clean"]["path"]) / "image.json").read_text())
    (prog,) = record["hardening"]["files"]
    assert prog["path"] == "/usr/bin/prog" and set(prog["results"].values()) <= {h.OK, h.NA}
    # A static, non-PIE program fails the image.
    add_static_hello(project)
    add_image(project, "bad", ["prog", "hello"])
    res = project.hadron("build", "bad", "--toolchain", "hard")
    assert res.returncode == 1
    assert "ELF files fail the hardening audit" in res.stderr and "/usr/bin/hello: ET_EXEC" in res.stderr
    assert "hardening_allowed" in res.stderr
    entry = ('[[hardening_allowed]]\npath = "/usr/bin/hello"\nchecks = ["pie"]\n'
             'reason = "test: a static program"\n')
    add_image(project, "bad", ["prog", "hello"], entry)
    res = project.hadron("build", "bad", "--toolchain", "hard")
    assert res.returncode == 0, res.stderr
    shown = project.hadron("image", "audit", "bad", "--toolchain", "hard", check=True).stdout
    assert "/usr/bin/hello" in shown and "allowed: /usr/bin/hello (pie): test: a static program" in shown
    # An entry that excuses nothing is an error: stale exceptions do not accumulate.
    add_image(project, "bad", ["prog", "hello"], entry + entry.replace("/usr/bin/hello", "/usr/bin/gone"))
    res = project.hadron("build", "bad", "--toolchain", "hard")
    assert res.returncode == 1 and "/usr/bin/gone (pie): excuses no file" in res.stderr
    # An entry without a reason is refused where it is written.
    add_image(project, "bad", ["prog", "hello"], entry.replace("test: a static program", ""))
    res = project.hadron("build", "bad", "--toolchain", "hard")
    assert res.returncode == 1 and "hardening_allowed.0.reason" in res.stderr


def test_profile_flags_reach_user_space_builds_but_not_the_kernel(tmp_path: Path) -> None:
    from dataclasses import replace

    from hadron.engine.executor import BuildRequest, step_environment
    from hadron.engine.recipe import load_recipes
    from hadron.engine.toolchain import load_toolchain
    from hadron.errors import HadronError

    root = Path(__file__).resolve().parents[1]
    recipes = load_recipes([root / "distro" / "packages"])
    for profile in ("host", "cross"):
        tc = load_toolchain(root, profile)
        assert h.fortify_from_flags(profile, tc.cflags).asserted
        env = {}
        for name in ("zlib", "systemd", "expat", "zstd", "busybox", "linux-cloud"):
            req = BuildRequest(recipe=recipes[name], key="0" * 64, sources=[], inputs={},
                               env_identity="buildenv:sha256:" + "1" * 64, toolchain=tc, source_date_epoch=0)
            env[name] = step_environment(req)
        for name in ("zlib", "systemd", "expat", "zstd", "busybox"):  # autotools, meson, cmake, make, custom
            assert env[name]["CFLAGS"] == " ".join(tc.cflags) and "-fstack-protector-strong" in env[name]["CFLAGS"]
            assert env[name]["LDFLAGS"] == " ".join(tc.ldflags) and "-Wl,-z,now" in env[name]["LDFLAGS"]
        assert not {"CFLAGS", "CXXFLAGS", "LDFLAGS"} & set(env["linux-cloud"])
        assert tc.digest() != replace(tc, ldflags=tc.ldflags[:-1]).digest()
    # Flags belong in [flags], where the audit reads them, not in [env].
    (tmp_path / "distro" / "toolchains").mkdir(parents=True)
    (tmp_path / "distro" / "toolchains" / "x.toml").write_text('name = "x"\nsummary = "x"\n[env]\nCFLAGS = "-O2"\n')
    with pytest.raises(HadronError, match=r"x.toml: env.CFLAGS: compile and link flags belong in \[flags\]"):
        load_toolchain(tmp_path, "x")


def test_a_protected_main_that_never_returns_counts_as_canary(tmp_path: Path) -> None:
    # main ends in exit(): gcc stores the guard but emits no check, so no __stack_chk_fail.
    src = "#include <stdlib.h>\n" + PROG_C.replace("return 0;", "exit(0);")
    root = tmp_path / "rootfs"
    for flags, want in (([], h.OK), (["-fno-stack-protector"], h.FAIL)):
        prog = compile_into(root, "usr/bin/prog", [*HARD, *flags], src)
        syms = subprocess.run(["nm", "-D", str(prog)], capture_output=True, text=True, check=True).stdout
        assert "__stack_chk_fail" not in syms
        (fa,) = h.audit_tree(root, "x86_64", FORTIFIED, []).files
        assert fa.results["canary"] == want
