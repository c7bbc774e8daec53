"""The ELF hardening audit of an image's root file system.

Every regular file that is an ELF object is classified and, when the dynamic loader or the kernel
runs it as a program or library of the image's architecture, checked for:

``pie``       an executable is position independent: ``ET_DYN`` with ``PT_INTERP`` or ``DF_1_PIE``
              (a shared library — ``ET_DYN`` without either — is position independent by nature:
              the check does not apply to it);
``relro``     a ``PT_GNU_RELRO`` segment;
``bind-now``  ``DT_BIND_NOW``, ``DF_BIND_NOW`` in ``DT_FLAGS`` or ``DF_1_NOW`` in ``DT_FLAGS_1``
              (full RELRO with ``relro``; does not apply to a file without ``PT_DYNAMIC``);
``nx``        a ``PT_GNU_STACK`` segment without ``PF_X``;
``canary``    ``__stack_chk_fail`` or ``__stack_chk_guard`` among the dynamic symbols (which
              stripping keeps) or the symbol table, or (x86_64) code that loads the stack guard
              from ``%fs:0x28``: a protected function that never returns (a ``main`` that ends in
              ``exit()``) stores the guard but has no check, so it needs no ``__stack_chk_fail``;
``rpath``     every ``DT_RPATH``/``DT_RUNPATH`` entry, ``$ORIGIN`` resolved against the file's
              directory, lies inside the image's library directories;
``textrel``   neither ``DT_TEXTREL`` nor ``DF_TEXTREL``;
``fortify``   FORTIFY leaves no trace in a musl binary (musl has no ``__*_chk`` functions), so it
              is asserted from the toolchain profile's compile flags: ``-D_FORTIFY_SOURCE=2`` or
              higher with optimisation. On musl that define provides no fortified functions.

Files the audit does not check, by rule: relocatable objects (``ET_REL``: kernel and GRUB
modules, linked by the kernel or GRUB, not by the dynamic loader), and ELF files of another
machine than the image's, which fail as ``arch`` unless the allow-list names them with a reason
(GRUB's i386 boot files are loaded by firmware and GRUB, not by Linux).

A violation fails the image unless an entry of the image's ``hardening_allowed`` names the file
(a glob) and the check, with a reason. An entry, or a check of one, that excuses nothing is an
error too, so the list never outgrows what the image holds.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

CHECKS = ("pie", "relro", "bind-now", "nx", "canary", "rpath", "textrel", "fortify")
# The check an ELF file of another architecture fails (it is not the image's program or library).
ARCH = "arch"
ALLOWABLE = (*CHECKS, ARCH)

# The image's library directories, relative to the root (/lib is /usr/lib after usrmerge).
LIBRARY_DIRS = ("usr/lib", "usr/lib64", "lib", "lib64")

# e_machine of each image architecture.
MACHINES = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64", "riscv64": "EM_RISCV"}

DF_TEXTREL = 0x4
DF_BIND_NOW = 0x8
DF_1_NOW = 0x1
DF_1_PIE = 0x08000000
PF_X = 0x1
CANARY_SYMBOLS = ("__stack_chk_fail", "__stack_chk_guard")

# Cell values of the table.
OK, FAIL, ALLOWED, NA = "ok", "FAIL", "allowed", "-"


@dataclass(frozen=True)
class Fortify:
    """What the toolchain profile's compile flags say about FORTIFY."""

    asserted: bool
    detail: str


def fortify_from_flags(profile: str, cflags: Sequence[str]) -> Fortify:
    """FORTIFY as the profile's ``[flags] cflags`` declare it: the last ``-D_FORTIFY_SOURCE=N``
    (not undone by a later ``-U_FORTIFY_SOURCE``) with N >= 2, and an optimisation level above
    -O0 (the define is inert without one)."""
    level = 0
    opt = False
    for f in cflags:
        m = re.fullmatch(r"-D_FORTIFY_SOURCE(?:=(\d+))?", f)
        if m:
            level = int(m.group(1) or "1")
        elif f == "-U_FORTIFY_SOURCE":
            level = 0
        elif re.fullmatch(r"-O(\d*|s|z|fast|g)", f):
            opt = f not in ("-O0",)
    where = f"toolchain profile {profile!r}, [flags] cflags"
    if level < 2:
        return Fortify(False, f"{where} do not define _FORTIFY_SOURCE=2 or higher")
    if not opt:
        return Fortify(False, f"{where} define _FORTIFY_SOURCE={level} without optimisation (-O1 or more)")
    return Fortify(True, f"-D_FORTIFY_SOURCE={level} in {where}; musl has no __*_chk functions, so on musl "
                         "it provides no fortified functions")


@dataclass(frozen=True)
class AllowEntry:
    """One ``hardening_allowed`` entry of an image: files (a glob over absolute paths in the image,
    ``*`` crossing ``/``), the checks they may fail, and why."""

    path: str
    checks: tuple[str, ...]
    reason: str

    def matches(self, rel: str) -> bool:
        return fnmatch.fnmatchcase("/" + rel, self.path)


@dataclass
class FileAudit:
    path: str  # relative to the root
    kind: str  # pie, exec, shared, static-pie, static, relocatable, foreign
    machine: str
    results: dict[str, str] = field(default_factory=dict)  # check → ok | FAIL | allowed | -
    details: dict[str, str] = field(default_factory=dict)  # check → why it failed
    allowed_by: dict[str, int] = field(default_factory=dict)  # check → index of the allow entry


@dataclass
class Audit:
    files: list[FileAudit]
    fortify: Fortify
    unused: list[str]  # allow-list entries (or checks of them) that excuse nothing

    @property
    def violations(self) -> list[tuple[FileAudit, str]]:
        return [(f, c) for f in self.files for c, v in f.results.items() if v == FAIL]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for c in ALLOWABLE:
            row = {OK: 0, FAIL: 0, ALLOWED: 0, NA: 0}
            for f in self.files:
                row[f.results.get(c, NA)] += 1
            out[c] = row
        return out

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.files:
            out[f.kind] = out.get(f.kind, 0) + 1
        return dict(sorted(out.items()))

    def record(self, allow: Sequence[AllowEntry]) -> dict[str, Any]:
        """The audit as the image record keeps it (what ``hadron image audit`` prints)."""
        return {
            "checks": list(ALLOWABLE),
            "fortify": {"asserted": self.fortify.asserted, "detail": self.fortify.detail},
            "kinds": self.kinds(),
            "counts": self.counts(),
            "files": [{"path": "/" + f.path, "kind": f.kind, "machine": f.machine, "results": f.results,
                       **({"details": f.details} if f.details else {}),
                       **({"allowed": {c: allow[i].reason for c, i in f.allowed_by.items()}}
                          if f.allowed_by else {})}
                      for f in self.files],
            "allowed": [{"path": a.path, "checks": list(a.checks), "reason": a.reason} for a in allow],
        }


def _dynamic(elf: ELFFile) -> Any:
    """The PT_DYNAMIC segment (a pyelftools DynamicSegment), read from the program headers, which
    stripping keeps; None for a file without one."""
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_DYNAMIC":
            return seg
    return None


def _has_symbol(elf: ELFFile, names: Iterable[str]) -> bool:
    wanted = set(names)
    for sec in elf.iter_sections():
        if (isinstance(sec, SymbolTableSection) and sec.name in (".dynsym", ".symtab")
                and any(s.name in wanted for s in sec.iter_symbols())):
            return True
    return False


# x86_64: mov %fs:0x28,<64-bit register> — how -fstack-protector code reads the guard (glibc and
# musl both keep it at that offset of the thread control block).
GUARD_LOAD = {"EM_X86_64": re.compile(rb"\x64[\x48\x4c]\x8b[\x04\x0c\x14\x1c\x24\x2c\x34\x3c]\x25\x28\x00\x00\x00")}


def _loads_guard(elf: ELFFile, machine: str) -> bool:
    pattern = GUARD_LOAD.get(machine)
    if pattern is None:
        return False
    return any(seg["p_type"] == "PT_LOAD" and seg["p_flags"] & PF_X and pattern.search(seg.data())
               for seg in elf.iter_segments())


def _inside_library_dirs(entry: str, file_dir: str) -> bool:
    """An RPATH/RUNPATH entry, ``$ORIGIN`` resolved against ``file_dir`` (absolute, in the image),
    names a directory inside the image's library directories."""
    if not entry:
        return False  # an empty entry is the working directory
    resolved = entry.replace("${ORIGIN}", file_dir).replace("$ORIGIN", file_dir)
    if "$" in resolved or not resolved.startswith("/"):
        return False  # $LIB, $PLATFORM, or relative to the working directory
    norm = posixpath.normpath(resolved)
    return any(norm == "/" + d or norm.startswith("/" + d + "/") for d in LIBRARY_DIRS)


def audit_file(path: Path, rel: str, arch: str, fortify: Fortify) -> FileAudit | None:
    """The audit of one file, or None when it is not an ELF object."""
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"\x7fELF":
                return None
            fh.seek(0)
            return _audit_elf(ELFFile(fh), rel, arch, fortify)
    except ELFError as e:
        fa = FileAudit(rel, "unreadable", "?")
        fa.results[ARCH] = FAIL
        fa.details[ARCH] = f"not a readable ELF file ({e})"
        return fa


def _audit_elf(elf: ELFFile, rel: str, arch: str, fortify: Fortify) -> FileAudit:
    etype = elf.header["e_type"]
    machine = str(elf.header["e_machine"])
    if etype == "ET_REL":
        return FileAudit(rel, "relocatable", machine)
    if machine != MACHINES.get(arch, machine):
        fa = FileAudit(rel, "foreign", machine)
        fa.results[ARCH] = FAIL
        fa.details[ARCH] = f"{machine} {etype}, not the image's {arch}"
        return fa
    segments = [s for s in elf.iter_segments()]
    types = {s["p_type"] for s in segments}
    dyn = _dynamic(elf)
    tags: dict[str, list[Any]] = {}
    if dyn is not None:
        for t in dyn.iter_tags():
            tags.setdefault(str(t.entry.d_tag), []).append(t)
    flags = sum(t.entry.d_val for t in tags.get("DT_FLAGS", []))
    flags_1 = sum(t.entry.d_val for t in tags.get("DT_FLAGS_1", []))
    pie_flag = bool(flags_1 & DF_1_PIE)
    interp = "PT_INTERP" in types
    if etype == "ET_EXEC":
        kind = "exec" if interp else "static"
    elif interp:
        kind = "pie"
    elif pie_flag:
        kind = "static-pie"
    else:
        kind = "shared"
    fa = FileAudit(rel, kind, machine)
    r, d = fa.results, fa.details

    def verdict(check: str, ok: bool, why: str) -> None:
        r[check] = OK if ok else FAIL
        if not ok:
            d[check] = why

    if kind == "shared":
        r["pie"] = NA
    else:
        verdict("pie", etype == "ET_DYN", "ET_EXEC: linked at a fixed address (not -pie)")
    verdict("relro", "PT_GNU_RELRO" in types, "no PT_GNU_RELRO segment (-z relro)")
    if dyn is None:
        r["bind-now"] = NA
    else:
        now = "DT_BIND_NOW" in tags or bool(flags & DF_BIND_NOW) or bool(flags_1 & DF_1_NOW)
        verdict("bind-now", now, "lazy binding: no DT_BIND_NOW, DF_BIND_NOW or DF_1_NOW (-z now)")
    stack = [s for s in segments if s["p_type"] == "PT_GNU_STACK"]
    if not stack:
        verdict("nx", False, "no PT_GNU_STACK segment: the stack may be executable")
    else:
        verdict("nx", not stack[0]["p_flags"] & PF_X, "PT_GNU_STACK is executable (-z execstack)")
    verdict("canary", _has_symbol(elf, CANARY_SYMBOLS) or _loads_guard(elf, machine),
            "no stack protector code: neither __stack_chk_fail nor __stack_chk_guard is referenced"
            + (" and no code loads the guard from %fs:0x28" if machine in GUARD_LOAD else ""))
    paths = [p for t in tags.get("DT_RPATH", []) for p in str(t.rpath).split(":")]
    paths += [p for t in tags.get("DT_RUNPATH", []) for p in str(t.runpath).split(":")]
    outside = [p for p in paths if not _inside_library_dirs(p, posixpath.dirname("/" + rel))]
    if dyn is None:
        r["rpath"] = NA
    else:
        verdict("rpath", not outside, "RPATH/RUNPATH outside the image's library directories: "
                + ", ".join(repr(p) for p in outside))
    if dyn is None:
        r["textrel"] = NA
    else:
        verdict("textrel", "DT_TEXTREL" not in tags and not flags & DF_TEXTREL,
                "text relocations (DT_TEXTREL): code not compiled position independent")
    verdict("fortify", fortify.asserted, fortify.detail)
    return fa


def audit_tree(root: Path, arch: str, fortify: Fortify, allow: Sequence[AllowEntry]) -> Audit:
    """Audit every regular ELF file under ``root`` (one name per hard-linked file) and apply the
    allow-list."""
    files: list[FileAudit] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            st = p.lstat()
            if not p.is_file() or p.is_symlink() or (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            fa = audit_file(p, p.relative_to(root).as_posix(), arch, fortify)
            if fa is not None:
                files.append(fa)
    used: set[tuple[int, str]] = set()
    for fa in files:
        for check, v in fa.results.items():
            if v != FAIL:
                continue
            for i, a in enumerate(allow):
                if check in a.checks and a.matches(fa.path):
                    fa.results[check] = ALLOWED
                    fa.allowed_by[check] = i
                    used.add((i, check))
                    break
    unused = []
    for i, a in enumerate(allow):
        idle = [c for c in a.checks if (i, c) not in used]
        if len(idle) == len(a.checks):
            unused.append(f"{a.path} ({', '.join(a.checks)}): excuses no file")
        elif idle:
            unused.append(f"{a.path}: checks {', '.join(idle)} excuse no file")
    return Audit(files, fortify, unused)


def table(record: dict[str, Any], *, everything: bool = False) -> list[str]:
    """The audit record as text: one row per file (only the files with a failed or allowed check
    unless ``everything``), then the counts per check and the allow-list with its reasons."""
    checks: list[str] = record["checks"]
    rows = [f for f in record["files"]
            if everything or any(v in (FAIL, ALLOWED) for v in f["results"].values())]
    width = max([len(f["path"]) for f in rows] + [4])
    cols = "  ".join(f"{c:<8}" for c in checks)
    lines = [f"{'file':<{width}}  {'kind':<11}  {cols}"]
    for f in rows:
        cells = "  ".join(f"{f['results'].get(c, NA):<8}" for c in checks)
        lines.append(f"{f['path']:<{width}}  {f['kind']:<11}  {cells}".rstrip())
    lines.append("")
    kinds = ", ".join(f"{n} {k}" for k, n in record["kinds"].items())
    lines.append(f"{len(record['files'])} ELF files: {kinds}")
    lines.append(f"{'check':<9} {OK:>6} {FAIL:>6} {ALLOWED:>8} {'n/a':>6}")
    for c in checks:
        n = record["counts"][c]
        lines.append(f"{c:<9} {n[OK]:>6} {n[FAIL]:>6} {n[ALLOWED]:>8} {n[NA]:>6}")
    lines.append(f"fortify: {record['fortify']['detail']}")
    for a in record["allowed"]:
        lines.append(f"allowed: {a['path']} ({', '.join(a['checks'])}): {a['reason']}")
    return lines
