"""Recipes: one declarative TOML file per upstream component, validated by a schema.

A recipe lives either in ``<dir>/<name>.toml`` or in ``<dir>/<name>/recipe.toml``; the folder form
may carry extra files (configuration fragments, project-owned sources) that the build sees read-only
at ``/recipe`` and that are part of the cache key. Every problem is reported as
``file: field: problem`` (see :class:`hadron.errors.RecipeError`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hadron.errors import RecipeError

NAME_RE = r"^[a-z0-9][a-z0-9+._-]*$"
SHA256_RE = r"^[0-9a-f]{64}$"
# A pragmatic SPDX expression check: ids joined by AND/OR/WITH, optional parentheses.
SPDX_ID = r"[A-Za-z0-9.+-]+"
SPDX_RE = re.compile(rf"^\(?{SPDX_ID}\)?(\s+(AND|OR|WITH)\s+\(?{SPDX_ID}\)?)*$")

Name = Annotated[str, Field(pattern=NAME_RE, max_length=64)]
Sha256 = Annotated[str, Field(pattern=SHA256_RE, description="lower-case hex sha256")]

PATCH_KEYS = frozenset({"patches", "patch", "patch_files"})

# Paths that go to the development output unless a recipe says otherwise.
DEFAULT_DEV_GLOBS = (
    "usr/include/**",
    "usr/lib/pkgconfig/**",
    "usr/share/pkgconfig/**",
    "usr/lib/**/*.a",
    "usr/lib/**/*.la",
    "usr/share/aclocal/**",
    "usr/lib/cmake/**",
)
# Paths dropped from every output (documentation is not shipped).
DEFAULT_DROP_GLOBS = (
    "usr/share/man/**",
    "usr/share/info/**",
    "usr/share/doc/**",
    "usr/share/gtk-doc/**",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MirrorAlternative(_Strict):
    """The same source as published by a mirror under another name, possibly repacked.

    Without ``sha256`` the file must be byte-identical to upstream. With it, the file is a repack
    (e.g. Debian's ``+dfsg`` tarballs) pinned by its own digest, and ``note`` says why.
    """

    provider: Literal["debian"]
    package: Name
    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9+._~-]+$")]
    sha256: Sha256 | None = None
    note: str | None = None

    @model_validator(mode="after")
    def _repack_needs_note(self) -> MirrorAlternative:
        if self.sha256 is not None and not self.note:
            raise ValueError("a repacked alternative (own sha256) needs a `note` saying what differs")
        return self


Fingerprint = Annotated[str, Field(pattern=r"^[0-9A-F]{40}$", description="OpenPGP v4 fingerprint, upper-case hex")]


class Signature(_Strict):
    """Upstream's detached OpenPGP signature of a source file and the keys allowed to have made it.

    The keys are files in the repository (``keys/<FINGERPRINT>.asc`` next to the recipe directory,
    see :func:`hadron.engine.signatures.key_file`), never looked up on a key server. Besides the
    upstream URL, a byte-identical Debian alternative's ``<file>.asc`` is tried.
    """

    url: Annotated[str, Field(pattern=r"^(https?|ftp)://\S+$")]
    keys: Annotated[list[Fingerprint], Field(min_length=1)]
    over: Literal["file", "uncompressed"] = Field(
        default="file", description="what was signed: the file itself, or (kernel.org's .tar.sign) the tar "
        "inside its compression",
    )
    legacy: Annotated[str, Field(min_length=10)] | None = Field(
        default=None, description="verify with GnuPG's gpgv, which accepts SHA-1 and DSA-1024, instead of "
        "Sequoia's sqv and its current policy; says why that is needed",
    )


# Source fields that authenticate a file without changing it; they are not part of the build key.
AUTHENTICATION_FIELDS = ("signature", "unsigned")


class Source(_Strict):
    url: Annotated[str, Field(pattern=r"^(https?|ftp)://\S+$")]
    sha256: Sha256 | None = Field(
        default=None, description="digest of the upstream file; omit only when no published or verifiable "
        "digest exists and an alternative pins a repack",
    )
    filename: Annotated[str, Field(pattern=r"^[A-Za-z0-9+._~-]+$")] | None = None
    signature: Signature | None = Field(
        default=None, description="upstream's detached OpenPGP signature of the file and the keys it must be "
        "made by; fetching verifies it before the file enters the source store",
    )
    unsigned: Annotated[str, Field(min_length=10)] | None = Field(
        default=None, description="why the file is trusted by its sha256 alone (upstream does not sign, or "
        "its signature or key cannot be had); required when there is no `signature`",
    )
    extract: bool = True
    strip_components: Annotated[int, Field(ge=0, le=4)] = 1
    destination: str = Field(default="", description="sub-directory of /src to unpack into")
    alternatives: list[MirrorAlternative] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Source:
        if self.sha256 is None and not any(a.sha256 for a in self.alternatives):
            raise ValueError("`sha256` is required (or an alternative that pins a repack by its own sha256)")
        if (self.signature is None) == (self.unsigned is None):
            raise ValueError("give either `signature` (upstream's detached signature and its keys) or "
                             "`unsigned` (why the sha256 pin alone is trusted), not both or neither")
        if self.signature is not None and self.sha256 is None:
            raise ValueError("a `signature` covers upstream's file, so `sha256` (its digest) is required")
        dest = PurePosixPath(self.destination)
        if dest.is_absolute() or ".." in dest.parts:
            raise ValueError("`destination` must be a relative path inside /src")
        return self

    @property
    def name(self) -> str:
        return self.filename or self.url.rstrip("/").rsplit("/", 1)[-1]

    def digests(self) -> list[str]:
        """Every digest this source may be verified by, upstream first."""
        out = [self.sha256] if self.sha256 else []
        out += [a.sha256 for a in self.alternatives if a.sha256 and a.sha256 not in out]
        return out


Args = list[str]


class _BuildBase(_Strict):
    env: dict[str, str] = Field(default_factory=dict, description="extra environment for every step")
    in_tree: bool | None = Field(default=None, description="build in a writable copy of the sources")
    subdir: str = Field(default="", description="directory below /src holding the build files")


class AutotoolsBuild(_BuildBase):
    system: Literal["autotools"]
    bootstrap: str = Field(
        default="",
        description="shell run in the writable source tree before configure, for sources shipped "
        "without a generated configure (for example `autoreconf -fi`); needs `in_tree = true`",
    )
    configure_args: Args = Field(default_factory=list)
    make_args: Args = Field(default_factory=list)
    install_args: Args = Field(default_factory=list)
    install_target: str = "install"

    @model_validator(mode="after")
    def _bootstrap_in_tree(self) -> AutotoolsBuild:
        if self.bootstrap and not self.in_tree:
            raise ValueError("`bootstrap` rewrites the source tree: set `in_tree = true`")
        return self


class MesonBuild(_BuildBase):
    system: Literal["meson"]
    options: dict[str, str | bool | int] = Field(default_factory=dict)
    buildtype: Literal["plain", "debug", "debugoptimized", "release", "minsize"] = "release"


class CMakeBuild(_BuildBase):
    system: Literal["cmake"]
    options: dict[str, str | bool | int] = Field(default_factory=dict)
    build_type: Literal["Release", "MinSizeRel", "RelWithDebInfo", "Debug"] = "Release"


class MakeBuild(_BuildBase):
    system: Literal["make"]
    make_args: Args = Field(default_factory=list)
    install_args: Args = Field(default_factory=list)
    install_target: str = "install"


class KbuildBuild(_BuildBase):
    system: Literal["kbuild"]
    base_config: str = Field(
        description="upstream make target(s) for the base config, e.g. `defconfig` or `tinyconfig kvm_guest.config`"
    )
    fragments: list[str] = Field(default_factory=list, description="config fragments in the recipe folder")
    targets: Args = Field(default_factory=lambda: ["all"])
    make_args: Args = Field(default_factory=list)
    install: str | None = Field(default=None, description="shell run after building, to fill $DESTDIR")


class CustomBuild(_BuildBase):
    system: Literal["custom"]
    configure: str | None = None
    build: str | None = None
    install: str = Field(description="shell snippet that installs into $DESTDIR")


BuildSpec = Annotated[
    AutotoolsBuild | MesonBuild | CMakeBuild | MakeBuild | KbuildBuild | CustomBuild,
    Field(discriminator="system"),
]


class Depends(_Strict):
    build: list[Name] = Field(default_factory=list, description="outputs needed at build time")
    run: list[Name] = Field(default_factory=list, description="packages needed at run time")
    host: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9+._-]+$")]] = Field(
        default_factory=list, description="programs the build environment must provide"
    )
    toolchain: bool = Field(
        default=True,
        description="build with the selected target toolchain (false: part of the toolchain itself, "
        "built with the build environment's compiler)",
    )


class Outputs(_Strict):
    dev: list[str] = Field(default_factory=lambda: list(DEFAULT_DEV_GLOBS))
    extra_dev: list[str] = Field(default_factory=list, description="added to the default dev globs")
    drop: list[str] = Field(default_factory=lambda: list(DEFAULT_DROP_GLOBS))
    extra_drop: list[str] = Field(default_factory=list)

    @field_validator("dev", "extra_dev", "drop", "extra_drop")
    @classmethod
    def _relative(cls, v: list[str]) -> list[str]:
        for g in v:
            if g.startswith("/") or ".." in g.split("/"):
                raise ValueError(f"{g!r}: output globs are relative to DESTDIR")
        return v


class Check(_Strict):
    command: str
    enabled: bool = True


class Recipe(_Strict):
    name: Name
    version: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9+._~-]+$")]
    summary: Annotated[str, Field(min_length=1, max_length=200)]
    license: str
    homepage: Annotated[str, Field(pattern=r"^https?://\S+$")]
    sources: list[Source] = Field(default_factory=list)
    build: BuildSpec
    depends: Depends = Field(default_factory=Depends)
    outputs: Outputs = Field(default_factory=Outputs)
    check: Check | None = None

    @field_validator("license")
    @classmethod
    def _spdx(cls, v: str) -> str:
        if not SPDX_RE.match(v):
            raise ValueError(f"{v!r} is not an SPDX license expression (e.g. `MIT`, `GPL-2.0-only`)")
        return v

    @model_validator(mode="after")
    def _deps(self) -> Recipe:
        if self.name in self.depends.build or self.name in self.depends.run:
            raise ValueError(f"`{self.name}` depends on itself")
        return self

    def dev_globs(self) -> list[str]:
        return [*self.outputs.dev, *self.outputs.extra_dev]

    def drop_globs(self) -> list[str]:
        return [*self.outputs.drop, *self.outputs.extra_drop]


@dataclass(frozen=True)
class LoadedRecipe:
    """A validated recipe together with where it came from."""

    recipe: Recipe
    path: Path
    folder: Path | None  # recipe folder with extra files, if the folder form is used
    files_digest: str = field(default="")  # digest of the folder's extra files

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def keys_dir(self) -> Path:
        """Where the keys its sources' signatures name live: ``keys/`` beside the recipe directory."""
        recipe_dir = self.folder.parent if self.folder else self.path.parent
        return recipe_dir.parent / "keys"

    def normalized(self) -> dict[str, Any]:
        return self.recipe.model_dump(mode="json")

    def digest(self) -> str:
        """What the build depends on: the recipe without the fields that only say how its sources
        are authenticated (a new signature or key does not change a single output byte)."""
        data = self.normalized()
        for src in data.get("sources", []):
            for name in AUTHENTICATION_FIELDS:
                src.pop(name, None)
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{blob}\0{self.files_digest}".encode()).hexdigest()


def _find_patches(data: Any, loc: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    found: list[tuple[str | int, ...]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            if k in PATCH_KEYS:
                found.append((*loc, k))
            found += _find_patches(v, (*loc, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found += _find_patches(v, (*loc, i))
    return found


def _fmt_loc(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "(recipe)"


_BUILD_TAGS = {"autotools", "meson", "cmake", "make", "kbuild", "custom"}


def _problems(path: Path, err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        # Drop the discriminator tag pydantic inserts into the location of union members.
        if len(loc) >= 2 and loc[0] == "build" and loc[1] in _BUILD_TAGS:
            loc = (loc[0], *loc[2:])
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.startswith(("function-", "str-"))))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "union_tag_invalid":
            msg = "unknown build system; expected one of " + ", ".join(sorted(_BUILD_TAGS))
        elif e["type"] == "union_tag_not_found":
            msg = "`system` is required: one of " + ", ".join(sorted(_BUILD_TAGS))
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{path}: {_fmt_loc(loc)}: {msg}")
    return lines


def digest_folder(folder: Path, recipe_file: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p == recipe_file or "__pycache__" in p.parts:
            continue
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            h.update(f"L {rel} {p.readlink()}\0".encode())
        elif p.is_file():
            mode = "x" if p.stat().st_mode & 0o111 else "f"
            h.update(f"{mode} {rel} {hashlib.sha256(p.read_bytes()).hexdigest()}\0".encode())
    return h.hexdigest()


def parse_recipe(path: Path, expect_name: str | None = None) -> LoadedRecipe:
    """Read and validate one recipe file. Raises RecipeError with ``file: field: problem`` lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError([f"{path}: (file): cannot read: {e}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError([f"{path}: (syntax): {e}"]) from None
    patches = _find_patches(data)
    if patches:
        raise RecipeError(
            [
                f"{path}: {_fmt_loc(loc)}: recipes cannot carry patches; Hadron builds upstream sources "
                "unmodified (fix the problem upstream or configure around it)"
                for loc in patches
            ]
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_problems(path, e)) from None
    if expect_name is not None and recipe.name != expect_name:
        raise RecipeError([f"{path}: name: {recipe.name!r} does not match the file name {expect_name!r}"])
    folder = path.parent if path.name == "recipe.toml" else None
    files_digest = digest_folder(folder, path) if folder else ""
    return LoadedRecipe(recipe=recipe, path=path, folder=folder, files_digest=files_digest)


def recipe_files(directory: Path, folder_file: str = "recipe.toml") -> dict[str, Path]:
    """Map name → definition file for one directory: ``<name>.toml`` or ``<name>/<folder_file>``."""
    found: dict[str, Path] = {}
    if not directory.is_dir():
        return found
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.suffix == ".toml":
            found[p.stem] = p
        elif p.is_dir() and (p / folder_file).is_file():
            found[p.name] = p / folder_file
    return found


def load_recipes(directories: list[Path]) -> dict[str, LoadedRecipe]:
    """Load every recipe; later directories add recipes or override earlier ones by name.

    All problems of all files are collected and raised together.
    """
    files: dict[str, Path] = {}
    for d in directories:
        files.update(recipe_files(d))
    recipes: dict[str, LoadedRecipe] = {}
    problems: list[str] = []
    for name, path in files.items():
        try:
            recipes[name] = parse_recipe(path, expect_name=name)
        except RecipeError as e:
            problems += e.problems
    for r in recipes.values():
        for kind in ("build", "run"):
            for i, dep in enumerate(getattr(r.recipe.depends, kind)):
                if dep not in files:
                    problems.append(f"{r.path}: depends.{kind}[{i}]: no recipe named {dep!r}")
        for frag_i, frag in enumerate(getattr(r.recipe.build, "fragments", [])):
            if r.folder is None or not (r.folder / frag).is_file():
                problems.append(f"{r.path}: build.fragments[{frag_i}]: {frag!r} is not a file in the recipe folder")
    if problems:
        raise RecipeError(problems)
    return recipes
