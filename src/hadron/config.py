"""Settings (frozen) and the build environment's identity.

Settings come from, in increasing precedence: built-in defaults, ``hadron.toml`` at the project
root, ``$HADRON_CONFIG`` (a file), environment variables (``HADRON_CACHE``, ``HADRON_MIRRORS``) and
command-line options.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hadron.errors import HadronError

# Programs every build step may use; their identity is part of every cache key.
BASE_HOST_TOOLS = ("sh", "make", "cc", "gcc", "ld", "as", "ar", "tar", "cp", "install")

# Debian packages that provide commonly needed host tools, for error hints.
DEBIAN_PACKAGE_OF = {
    "makeinfo": "texinfo",
    "meson": "meson (or `pip install meson`)",
    "ninja": "ninja-build",
    "pkg-config": "pkgconf",
    "gperf": "gperf",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "rsync": "rsync",
    "cmake": "cmake",
    "cc": "gcc",
    "gcc": "gcc",
    "g++": "g++",
    "make": "make",
    "perl": "perl",
    "python3": "python3",
    "xz": "xz-utils",
    "bzip2": "bzip2",
    "zstd": "zstd",
    "cpio": "cpio",
    "bwrap": "bubblewrap",
}


class FileConfig(BaseModel):
    """Schema of hadron.toml."""

    model_config = ConfigDict(extra="forbid")

    class Fetch(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mirrors: list[str] = Field(default_factory=lambda: ["debian"])
        upstream: bool = True

    class BuildEnv(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: list[str] = Field(default_factory=list, description="host directories prepended to PATH")

    class Build(BaseModel):
        model_config = ConfigDict(extra="forbid")
        toolchain: str = "native"
        arch: str = "x86_64"
        default_image: str | None = None
        source_date_epoch: int = 1735689600  # 2025-01-01T00:00:00Z

    cache_dir: str | None = None
    fetch: Fetch = Field(default_factory=Fetch)
    build_env: BuildEnv = Field(default_factory=BuildEnv)
    build: Build = Field(default_factory=Build)


@dataclass(frozen=True)
class Settings:
    project: Path
    cache_dir: Path
    recipe_dirs: tuple[Path, ...]
    jobs: int
    offline: bool = False
    keep_going: bool = False
    mirrors: tuple[str, ...] = ("debian",)
    upstream: bool = True
    toolchain: str = "native"
    arch: str = "x86_64"
    source_date_epoch: int = 1735689600
    extra_path: tuple[str, ...] = field(default_factory=tuple)
    default_image: str | None = None


def find_project(start: Path | None = None) -> Path:
    """The directory holding ``distro/``: the working directory or a parent, else the source tree."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "distro" / "packages").is_dir():
            return d
    pkg_root = Path(__file__).resolve().parents[2]
    if (pkg_root / "distro" / "packages").is_dir():
        return pkg_root
    return here


def read_file_config(project: Path) -> FileConfig:
    data: dict[str, Any] = {}
    for path in (project / "hadron.toml", Path(os.environ["HADRON_CONFIG"]) if "HADRON_CONFIG" in os.environ else None):
        if path is None or not path.is_file():
            continue
        try:
            data = _merge(data, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise HadronError(f"{path}: (syntax): {e}") from None
        try:
            FileConfig.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise HadronError(f"{path}: {loc}: {first['msg']}") from None
    return FileConfig.model_validate(data)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(
    *,
    project: Path | None = None,
    extra_recipes: list[Path] | None = None,
    jobs: int | None = None,
    offline: bool = False,
    keep_going: bool = False,
    toolchain: str | None = None,
    cache_dir: Path | None = None,
) -> Settings:
    proj = project or find_project()
    fc = read_file_config(proj)
    cache = cache_dir or Path(
        os.environ.get("HADRON_CACHE") or fc.cache_dir or Path.home() / ".cache" / "hadron"
    ).expanduser()
    mirrors = tuple(os.environ["HADRON_MIRRORS"].split()) if "HADRON_MIRRORS" in os.environ else tuple(fc.fetch.mirrors)
    dirs = (proj / "distro" / "packages", *(p.resolve() for p in (extra_recipes or [])))
    return Settings(
        project=proj,
        cache_dir=cache,
        recipe_dirs=dirs,
        jobs=jobs or os.cpu_count() or 1,
        offline=offline,
        keep_going=keep_going,
        mirrors=mirrors,
        upstream=fc.fetch.upstream,
        toolchain=toolchain or fc.build.toolchain,
        arch=fc.build.arch,
        source_date_epoch=fc.build.source_date_epoch,
        extra_path=tuple(fc.build_env.path),
        default_image=fc.build.default_image,
    )


def sandbox_path(settings: Settings) -> str:
    from hadron.engine.sandbox import SANDBOX_PATH

    return ":".join([*settings.extra_path, SANDBOX_PATH])


def which(tool: str, settings: Settings) -> str | None:
    return shutil.which(tool, path=sandbox_path(settings))


class EnvIdentity:
    """Identity of the host build environment: the content of the programs builds use.

    Each tool is identified by the sha256 of the file it resolves to (memoized on disk by path,
    size, mtime and inode, so a no-op build does not re-hash compilers).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.memo_path = settings.cache_dir / "envid.json"
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

    def tool_digest(self, tool: str) -> str | None:
        found = which(tool, self.settings)
        if not found:
            return None
        real = os.path.realpath(found)
        st = os.stat(real)
        stamp = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
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
        return [t for t in tools if which(t, self.settings) is None]

    def identity(self, tools: list[str]) -> str:
        key = tuple(sorted(set(BASE_HOST_TOOLS) | set(tools)))
        if key not in self._by_tools:
            doc = {t: self.tool_digest(t) for t in key}
            doc["os-release"] = _os_release()
            self._by_tools[key] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
        return self._by_tools[key]

    def save(self) -> None:
        if self._dirty and self._memo is not None:
            self.memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._memo))
            os.replace(tmp, self.memo_path)
            self._dirty = False


@cache
def _os_release() -> str:
    for p in (Path("/etc/os-release"), Path("/usr/lib/os-release")):
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
    return ""


def missing_tools_error(missing: dict[str, list[str]]) -> HadronError:
    """``missing`` maps a tool to the recipes that need it."""
    lines = []
    pkgs = []
    for tool, who in sorted(missing.items()):
        lines.append(f"  {tool}: needed by {', '.join(who)}")
        pkgs.append(DEBIAN_PACKAGE_OF.get(tool, tool))
    return HadronError(
        "the build environment lacks required program(s):\n" + "\n".join(lines),
        hint="install them, e.g. apt-get install " + " ".join(sorted(set(pkgs))),
    )
