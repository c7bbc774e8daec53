"""The build host: which Debian package provides each program Hadron may ask for, and the identity
of the build environment.

``host-packages.tsv`` (next to this module) is the one table of host programs and files: recipes'
``depends.host``, toolchain profiles' ``host_tools``, the build-system helpers, image assembly, disk
and boot steps, tests and benchmarks. ``scripts/host-setup`` installs every package it names;
errors about a missing program name the package from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from hadron.errors import HadronError

TABLE = Path(__file__).with_name("host-packages.tsv")
SETUP = "scripts/host-setup"
# The PATH of every build sandbox, after the directories hadron.toml's [build_env] path adds.
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Programs every build step may use; their identity is part of every cache key.
BASE_HOST_TOOLS = ("sh", "make", "cc", "gcc", "ld", "as", "ar", "tar", "cp", "install")


@dataclass(frozen=True)
class Row:
    name: str  # a program name, or an absolute path for a file
    package: str
    needed_by: str
    section: str = ""  # the heading of its "## " section, up to the colon


@cache
def table() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    section = ""
    for n, line in enumerate(TABLE.read_text().splitlines(), 1):
        if line.startswith("## "):
            section = line[3:].split(":")[0].strip()
            continue
        if not line.strip() or line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 3 or not all(c.strip() for c in cols):
            raise HadronError(f"{TABLE}:{n}: expected three tab-separated columns: program, package, needed by")
        if cols[0] in rows:
            raise HadronError(f"{TABLE}:{n}: {cols[0]} has two rows")
        rows[cols[0]] = Row(cols[0], cols[1], cols[2], section)
    return rows


BUILD_ENV_SECTION = "build environment"


def build_env_packages() -> list[str]:
    """The Debian packages of the table's build-environment section: the hermetic environment's."""
    return sorted({r.package for r in table().values() if r.section == BUILD_ENV_SECTION})


def package_of(name: str) -> str | None:
    row = table().get(name)
    return row.package if row else None


def install_hint(names: list[str]) -> str:
    """What to run to get ``names`` (programs or files): the Debian packages from the table."""
    pkgs = sorted({p for n in names if (p := package_of(n))})
    unknown = sorted(n for n in names if package_of(n) is None)
    parts = []
    if pkgs:
        parts.append(f"apt-get install {' '.join(pkgs)} (or run {SETUP}, which installs every package Hadron uses)")
    if unknown:
        parts.append(f"no Debian package is known for {', '.join(unknown)}: install it, or add a row to {TABLE}")
    return "; ".join(parts)


def present(name: str, path: str | None = None) -> bool:
    """Whether a program (on ``path``, default this process's PATH) or an absolute file exists."""
    if name.startswith("/"):
        return Path(name).exists()
    return shutil.which(name, path=path) is not None


def missing_tools_error(missing: dict[str, list[str]], env: str | None = None) -> HadronError:
    """``missing`` maps a program to who needs it; ``env`` names the locked build environment."""
    lines = [f"  {tool}: needed by {', '.join(who)}" for tool, who in sorted(missing.items())]
    if env is None:
        return HadronError("the build environment lacks required program(s):\n" + "\n".join(lines),
                           hint=install_hint(sorted(missing)))
    pkgs = sorted({p for n in missing if (p := package_of(n))})
    return HadronError(f"the build environment {env} lacks required program(s):\n" + "\n".join(lines),
                       hint=f"add a row for each to the \"{BUILD_ENV_SECTION}\" section of {TABLE} "
                       f"(Debian package(s): {', '.join(pkgs) or 'unknown'}), then run "
                       "`hadron buildenv build --update-lock`")


def sandbox_path(extra_path: tuple[str, ...]) -> str:
    return ":".join([*extra_path, SANDBOX_PATH])


def tool_stamp(path: str) -> str:
    """A cheap identity of a file's current version (size, mtime, inode, ctime)."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


class EnvIdentity:
    """Identity of the host build environment: the content of the programs builds use.

    Each tool is identified by the sha256 of the file it resolves to (memoized on disk by path and
    :func:`tool_stamp`, so a no-op build does not re-hash compilers)."""

    def __init__(self, extra_path: tuple[str, ...], memo_path: Path) -> None:
        self.path = sandbox_path(extra_path)
        self.memo_path = memo_path
        self._memo: dict[str, Any] | None = None
        self._dirty = False
        self._by_tools: dict[tuple[str, ...], str] = {}

    def _load(self) -> dict[str, Any]:
        if self._memo is None:
            try:
                self._memo = json.loads(self.memo_path.read_text())
            except (OSError, ValueError):
                self._memo = {}
        return self._memo

    def which(self, tool: str) -> str | None:
        return shutil.which(tool, path=self.path)

    def tool_digest(self, tool: str) -> str | None:
        found = self.which(tool)
        if not found:
            return None
        real = os.path.realpath(found)
        stamp = tool_stamp(real)
        memo = self._load()
        hit = memo.get(real)
        if hit and hit[0] == stamp:
            return str(hit[1])
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        memo[real] = [stamp, h.hexdigest()]
        self._dirty = True
        return h.hexdigest()

    def missing(self, tools: list[str]) -> list[str]:
        return [t for t in tools if self.which(t) is None]

    def identity(self, tools: list[str]) -> str:
        key = tuple(sorted(set(BASE_HOST_TOOLS) | set(tools)))
        if key not in self._by_tools:
            doc = {t: self.tool_digest(t) for t in key}
            doc["os-release"] = os_release_digest()
            self._by_tools[key] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return self._by_tools[key]

    def save(self) -> None:
        if self._dirty and self._memo is not None:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._memo))
            os.replace(tmp, self.memo_path)
            self._dirty = False


OS_RELEASE = (Path("/etc/os-release"), Path("/usr/lib/os-release"))


@cache
def os_release_digest() -> str:
    for p in OS_RELEASE:
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
    return ""
