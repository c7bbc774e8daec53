"""Image definitions: ``distro/images/<name>.toml`` or ``<name>/image.toml`` with a ``files/`` tree
copied over the root filesystem; ``extends`` starts from another image's packages and files."""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hadron.engine.recipe import recipe_files
from hadron.errors import HadronError
from hadron.image.hardening import ALLOWABLE


class HardeningAllow(BaseModel):
    """An exception to the ELF hardening audit: files (a glob over absolute paths in the image,
    ``*`` crossing ``/``), the checks they may fail, and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(pattern=r"^/", description="glob over absolute paths in the image")
    checks: list[Literal[ALLOWABLE]] = Field(min_length=1)  # type: ignore[valid-type]
    reason: str = Field(pattern=r"\S", description="why the files may fail these checks")


class ImageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    summary: str
    version: str = Field(pattern=r"^[A-Za-z0-9._~+-]+$")
    packages: list[str] = Field(min_length=1)
    kernel: str | None = Field(default=None, description="package providing /boot/vmlinuz-* and modules")
    sysext_level: str = "1"
    os_release: dict[str, str] = Field(default_factory=dict)
    setuid_allowed: list[str] = Field(default_factory=list, description="paths allowed to be setuid/setgid")
    dlopen_absent: dict[str, str] = Field(
        default_factory=dict,
        description="soname → why the image leaves out a library its programs name in .note.dlopen")
    hardening_allowed: list[HardeningAllow] = Field(
        default_factory=list, description="ELF files allowed to fail hardening checks, with the reason")
    cmd: list[str] = Field(default_factory=lambda: ["/bin/sh"])
    strip: bool = True
    extends: str | None = Field(default=None, description="image whose packages and files this one starts from")
    boot: list[Literal["grub", "trusted", "immutable"]] = Field(
        default_factory=list, description="boot paths the image carries: grub (GRUB + dracut), trusted (UKI), "
                                          "immutable (UKI + verity-protected erofs root in A/B slots)")
    replaces: dict[str, list[str]] = Field(
        default_factory=dict, description="package → packages whose files of the same path it replaces")


@dataclass(frozen=True)
class LoadedImage:
    spec: ImageSpec
    path: Path
    files: tuple[Path, ...]  # files/ trees copied over the root filesystem, in order

    @property
    def name(self) -> str:
        return self.spec.name

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.spec.model_dump(mode="json"), sort_keys=True).encode())
        for n, files in enumerate(self.files):
            h.update(f"T {n}\0".encode())
            for p in sorted(files.rglob("*")):
                rel = p.relative_to(files).as_posix()
                if p.is_symlink():
                    h.update(f"L {rel} {os.readlink(p)}\0".encode())
                elif p.is_file():
                    h.update(f"F {rel} {oct(p.stat().st_mode & 0o7777)} ".encode() + p.read_bytes() + b"\0")
                elif p.is_dir():
                    h.update(f"D {rel}\0".encode())
        return h.hexdigest()


def image_files(directory: Path) -> dict[str, Path]:
    """Map image name → definition file: ``<name>.toml`` or ``<name>/image.toml``."""
    return recipe_files(directory, "image.toml")


def _read_image_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise HadronError(f"{path}: (syntax): {e}") from None


def _own_files(path: Path) -> tuple[Path, ...]:
    files = path.parent / "files"
    return (files,) if path.name == "image.toml" and files.is_dir() else ()


def load_image(path: Path, known: Mapping[str, Path] | None = None, _chain: tuple[str, ...] = ()) -> LoadedImage:
    """Load an image definition; with ``extends``, the parent (found in ``known``) comes first:
    its packages then this image's, its files/ tree then this one's, its other fields unless this
    image sets them."""
    data = _read_image_toml(path)
    files = _own_files(path)
    parent_name = data.get("extends")
    if isinstance(parent_name, str):
        chain = (*_chain, str(data.get("name", path.parent.name)))
        if parent_name in chain:
            raise HadronError(f"{path}: extends: a cycle: {' → '.join((*chain, parent_name))}")
        parent_path = (known or {}).get(parent_name)
        if parent_path is None:
            raise HadronError(f"{path}: extends: no image named {parent_name!r}",
                              hint=f"known images: {', '.join(sorted(known or {})) or 'none'}")
        parent = load_image(parent_path, known, chain)
        merged = parent.spec.model_dump(mode="json", exclude_unset=True)
        merged.pop("extends", None)
        own_packages = data.get("packages", [])
        merged.update(data)
        if isinstance(own_packages, list):
            merged["packages"] = [*parent.spec.packages, *(p for p in own_packages if p not in parent.spec.packages)]
        own_replaces = data.get("replaces", {})
        if isinstance(own_replaces, dict):
            # The parent's replacements hold in the child too; the child adds its own.
            merged["replaces"] = {**parent.spec.replaces, **own_replaces}
        own_allowed = data.get("hardening_allowed", [])
        if isinstance(own_allowed, list):
            # The parent's hardening exceptions hold in the child too; the child adds its own.
            merged["hardening_allowed"] = [a.model_dump() for a in parent.spec.hardening_allowed] + own_allowed
        data = merged
        files = (*parent.files, *files)
    try:
        spec = ImageSpec.model_validate(data)
    except ValidationError as e:
        lines = [f"{path}: {'.'.join(map(str, er['loc'])) or '(image)'}: {er['msg']}" for er in e.errors()]
        raise HadronError("invalid image definition:\n  " + "\n  ".join(lines)) from None
    for pkg, losers in spec.replaces.items():
        for n in [pkg, *losers]:
            if n not in spec.packages:
                raise HadronError(f"{path}: replaces: {n} is not one of the image's packages")
    return LoadedImage(spec, path, files)
