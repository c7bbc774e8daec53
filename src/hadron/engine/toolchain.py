"""Toolchain profiles: which compiler target recipes are built with.

A profile is data (``distro/toolchains/<name>.toml``): the packages that provide it (implicit build
dependencies of every recipe with ``depends.toolchain = true``), directories prepended to ``PATH``,
environment for the build-system helpers and the target compile and link flags (``[flags]``,
exported as ``CFLAGS``/``CXXFLAGS``/``LDFLAGS`` to user-space builds; kbuild recipes do not get
them). The image hardening audit reads ``[flags]`` for what a binary cannot show (FORTIFY).
``native`` — the build environment's own compiler,
no extra packages — is built in and used for engine tests.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hadron.errors import HadronError

FLAG_VARIABLES = ("CFLAGS", "CXXFLAGS", "LDFLAGS")


class FlagsSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cflags: list[str] = Field(default_factory=list, description="CFLAGS and CXXFLAGS of user-space builds")
    ldflags: list[str] = Field(default_factory=list, description="LDFLAGS of user-space builds")


class ToolchainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    summary: str
    packages: list[str] = Field(default_factory=list)
    path: list[str] = Field(default_factory=list, description="directories prepended to PATH")
    env: dict[str, str] = Field(default_factory=dict)
    host_tools: list[str] = Field(default_factory=list)
    flags: FlagsSpec = Field(default_factory=FlagsSpec)


@dataclass(frozen=True)
class Toolchain:
    name: str
    packages: tuple[str, ...] = ()
    path: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    host_tools: tuple[str, ...] = ()
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()
    # Whether images built with the profile must pass the ELF hardening audit (hadron.image.hardening).
    audited: bool = True

    def digest(self) -> str:
        """The profile's content: a changed compiler flag or prefix must change every key it reaches."""
        doc = {"name": self.name, "packages": list(self.packages), "path": list(self.path),
               "env": dict(sorted(self.env.items())), "host_tools": list(self.host_tools)}
        if self.cflags or self.ldflags:  # profiles without [flags] keep the keys they had
            doc["flags"] = {"cflags": list(self.cflags), "ldflags": list(self.ldflags)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def step_env(self) -> dict[str, str]:
        # HADRON_RUN: a command prefix that runs a target program on the build machine (checks).
        # HADRON_KERNEL_CROSS_COMPILE: the tool prefix kbuild gets (empty: the build machine's gcc).
        out = {"HADRON_CONFIGURE_HOST": "", "HADRON_MESON_ARGS": "", "HADRON_CMAKE_ARGS": "", "HADRON_RUN": "",
               "HADRON_KERNEL_CROSS_COMPILE": ""}
        if self.cflags:
            out["CFLAGS"] = out["CXXFLAGS"] = " ".join(self.cflags)
        if self.ldflags:
            out["LDFLAGS"] = " ".join(self.ldflags)
        out.update(self.env)
        return out


# The build machine's compiler and C library: engine tests build with it, and its programs are not
# the distribution's, so its images get the hardening table without failing on it.
NATIVE = Toolchain(name="native", audited=False)


def load_toolchain(project: Path, name: str) -> Toolchain:
    if name == "native":
        return NATIVE
    path = project / "distro" / "toolchains" / f"{name}.toml"
    if not path.is_file():
        known = sorted(["native", *(p.stem for p in (project / "distro" / "toolchains").glob("*.toml"))])
        raise HadronError(f"unknown toolchain profile {name!r}", hint="choose one of: " + ", ".join(known))
    try:
        spec = ToolchainSpec.model_validate(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as e:
        raise HadronError(f"{path}: (syntax): {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise HadronError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    clash = sorted(set(FLAG_VARIABLES) & set(spec.env))
    if clash:
        raise HadronError(f"{path}: env.{clash[0]}: compile and link flags belong in [flags]",
                          hint="move them to [flags] cflags/ldflags (kbuild recipes must not get them)")
    return Toolchain(spec.name, tuple(spec.packages), tuple(spec.path), dict(spec.env), tuple(spec.host_tools),
                     tuple(spec.flags.cflags), tuple(spec.flags.ldflags))
