"""The schema of ``hadron.toml`` (pydantic), kept apart from :mod:`hadron.config` so that reading
settings for a no-op build does not load pydantic."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FileConfig(BaseModel):
    """Schema of hadron.toml."""

    model_config = ConfigDict(extra="forbid")

    class Fetch(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mirrors: list[str] = Field(default_factory=lambda: ["debian"])
        upstream: bool = True

    class BuildEnv(BaseModel):
        model_config = ConfigDict(extra="forbid")
        path: list[str] = Field(default_factory=list, description="directories prepended to PATH")
        # "lock": package builds run in the build environment buildenv.lock names (a project without
        # the file uses the host's); "host": in the host's /usr, keys hashing the host's programs.
        root: Literal["lock", "host"] = "lock"
        remote: str | None = None  # registry repository the locked environment is pulled from by digest
        tls_verify: bool = True

    class Build(BaseModel):
        model_config = ConfigDict(extra="forbid")
        toolchain: str = "native"
        arch: str = "x86_64"
        default_image: str | None = None
        source_date_epoch: int = 1735689600  # 2025-01-01T00:00:00Z

    class RemoteCache(BaseModel):
        model_config = ConfigDict(extra="forbid")
        remote: str | None = None  # registry repository, e.g. "registry.example:5000/hadron/cache"
        trusted_keys: list[str] = Field(default_factory=list)  # "NAME:base64" public keys
        signing_key: str | None = None  # this builder's secret key file ($HADRON_CACHE_SIGNING_KEY)
        push: bool = True  # push what this machine builds (when a signing key is set)
        tls_verify: bool = True

    cache_dir: str | None = None
    cache: RemoteCache = Field(default_factory=RemoteCache)
    fetch: Fetch = Field(default_factory=Fetch)
    build_env: BuildEnv = Field(default_factory=BuildEnv)
    build: Build = Field(default_factory=Build)
