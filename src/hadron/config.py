"""Settings (frozen): everything a run is configured with.

Settings come from, in increasing precedence: built-in defaults, ``hadron.toml`` at the project
root, ``$HADRON_CONFIG`` (a file), environment variables (``HADRON_CACHE``, ``HADRON_MIRRORS``,
``HADRON_BUILD_ENV``, ``HADRON_CACHE_REMOTE``, ``HADRON_CACHE_SIGNING_KEY``) and command-line
options.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hadron.errors import HadronError

if TYPE_CHECKING:
    from hadron.configfile import FileConfig


@dataclass(frozen=True)
class Settings:
    project: Path
    cache_dir: Path
    recipe_dirs: tuple[Path, ...]
    jobs: int
    offline: bool = False
    keep_going: bool = True
    check: bool = True  # run the recipes' check steps
    mirrors: tuple[str, ...] = ("debian",)
    upstream: bool = True
    toolchain: str = "native"
    arch: str = "x86_64"
    source_date_epoch: int = 1735689600
    extra_path: tuple[str, ...] = field(default_factory=tuple)
    default_image: str | None = None
    env_root: str = "lock"  # [build_env] root: "lock" or "host"
    env_remote: str | None = None
    env_tls_verify: bool = True
    cache_remote: str | None = None  # [cache] remote: a registry repository of signed outputs
    cache_trusted_keys: tuple[str, ...] = ()
    cache_signing_key: Path | None = None
    cache_push: bool = True
    cache_tls_verify: bool = True
    executor: str = "local"  # "local" or "buildkit[=ADDR,…]"


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


def config_files(project: Path) -> list[Path]:
    """The configuration files that apply, in increasing precedence."""
    files = [project / "hadron.toml"]
    if "HADRON_CONFIG" in os.environ:
        files.append(Path(os.environ["HADRON_CONFIG"]))
    return [p for p in files if p.is_file()]


def cache_root(project: Path, cache_dir: Path | None) -> Path:
    """The cache directory: the command line, else $HADRON_CACHE, else ``cache_dir`` of the
    configuration files, else ~/.cache/hadron. Reads the files without validating them."""
    if cache_dir is not None:
        return cache_dir
    if os.environ.get("HADRON_CACHE"):
        return Path(os.environ["HADRON_CACHE"]).expanduser()
    import tomllib  # here, not at the top: the no-op path reads no file it does not need

    configured: str | None = None
    for path in config_files(project):
        try:
            value = tomllib.loads(path.read_text()).get("cache_dir")
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if isinstance(value, str):
            configured = value
    return Path(configured or Path.home() / ".cache" / "hadron").expanduser()


def read_file_config(project: Path) -> FileConfig:
    import tomllib

    from pydantic import ValidationError

    from hadron.configfile import FileConfig

    data: dict[str, Any] = {}
    for path in config_files(project):
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
    keep_going: bool = True,
    check: bool = True,
    toolchain: str | None = None,
    cache_dir: Path | None = None,
    executor: str = "local",
) -> Settings:
    proj = project or find_project()
    fc = read_file_config(proj)
    cache = cache_root(proj, cache_dir)
    mirrors = tuple(os.environ["HADRON_MIRRORS"].split()) if "HADRON_MIRRORS" in os.environ else tuple(fc.fetch.mirrors)
    env_root = os.environ.get("HADRON_BUILD_ENV") or fc.build_env.root
    if env_root not in ("lock", "host"):
        raise HadronError(f"HADRON_BUILD_ENV: {env_root!r} is not a build environment root",
                          hint='use "lock" (the environment buildenv.lock names) or "host" (this host\'s /usr)')
    dirs = (proj / "distro" / "packages", *(p.resolve() for p in (extra_recipes or [])))
    return Settings(
        project=proj,
        cache_dir=cache,
        recipe_dirs=dirs,
        jobs=jobs or os.cpu_count() or 1,
        offline=offline,
        keep_going=keep_going,
        check=check,
        mirrors=mirrors,
        upstream=fc.fetch.upstream,
        toolchain=toolchain or fc.build.toolchain,
        arch=fc.build.arch,
        source_date_epoch=fc.build.source_date_epoch,
        extra_path=tuple(fc.build_env.path),
        default_image=fc.build.default_image,
        env_root=env_root,
        env_remote=fc.build_env.remote,
        env_tls_verify=fc.build_env.tls_verify,
        cache_remote=os.environ.get("HADRON_CACHE_REMOTE") or fc.cache.remote,
        cache_trusted_keys=tuple(fc.cache.trusted_keys),
        cache_signing_key=_signing_key(proj, fc.cache.signing_key),
        cache_push=fc.cache.push,
        cache_tls_verify=fc.cache.tls_verify,
        executor=executor,
    )


def _signing_key(project: Path, configured: str | None) -> Path | None:
    value = os.environ.get("HADRON_CACHE_SIGNING_KEY") or configured
    if not value:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else project / p
