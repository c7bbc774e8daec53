"""The one mutable object of a run: settings plus everything loaded from them."""

from __future__ import annotations

import base64
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from hadron.config import Settings
from hadron.engine import buildenv
from hadron.engine.buildenv import BuildEnv
from hadron.engine.cache import Cache
from hadron.engine.executor import Executor, LocalExecutor
from hadron.engine.fetch import SourceStore
from hadron.engine.graph import Graph
from hadron.engine.jobs import JobServer
from hadron.engine.mirrors import MirrorProvider, make_providers
from hadron.engine.recipe import LoadedRecipe, load_recipes
from hadron.engine.remote import RemoteCache, load_signing_key, parse_trusted
from hadron.engine.sandbox import STANDARD, Variation
from hadron.engine.scheduler import Planner
from hadron.engine.toolchain import Toolchain, load_toolchain
from hadron.errors import HadronError
from hadron.image.definition import LoadedImage, image_files, load_image
from hadron.layout import CacheLayout


@dataclass
class Context:
    settings: Settings
    # Where notes for the user go (progress of long set-up steps, warnings); the CLI may replace it.
    say: Callable[[str], None] = field(default=lambda m: print(m, file=sys.stderr))
    # What local build steps see of the machine (hostname, user, umask, locale, time zone); only
    # `hadron verify-repro` changes it.
    variation: Variation = STANDARD

    @cached_property
    def recipes(self) -> dict[str, LoadedRecipe]:
        return load_recipes(list(self.settings.recipe_dirs))

    @cached_property
    def toolchain(self) -> Toolchain:
        return load_toolchain(self.settings.project, self.settings.toolchain)

    @cached_property
    def graph(self) -> Graph:
        g = Graph(self.recipes, self.toolchain.packages)
        g.check_targets(self.toolchain.packages)
        return g

    @cached_property
    def layout(self) -> CacheLayout:
        return CacheLayout(self.settings.cache_dir)

    @cached_property
    def cache(self) -> Cache:
        return Cache(self.layout)

    @cached_property
    def store(self) -> SourceStore:
        return SourceStore(self.layout)

    @cached_property
    def mirrors(self) -> list[MirrorProvider]:
        return make_providers(list(self.settings.mirrors))

    @cached_property
    def build_env(self) -> BuildEnv | None:
        """The environment package builds run in: the one buildenv.lock names (fetched or built when
        absent), or None for the host's /usr ([build_env] root = "host", or no lock)."""
        s = self.settings
        if s.env_root == "host":
            return None
        return buildenv.ensure(self.layout, s.project, remote=s.env_remote, tls_verify=s.env_tls_verify,
                               warn=lambda m: self.say(f"warning: {m}"), log=lambda m: self.say(f"buildenv: {m}"))

    @cached_property
    def remote(self) -> RemoteCache | None:
        """The registry binary cache ([cache] remote in hadron.toml), or None."""
        s = self.settings
        if not s.cache_remote:
            return None
        key = load_signing_key(s.cache_signing_key) if s.cache_signing_key else None
        trusted = parse_trusted(s.cache_trusted_keys)
        if key is not None:  # a builder trusts what it signs itself
            name, raw = key.name, base64.b64decode(key.public().partition(":")[2])
            trusted.setdefault(name, raw)
        return RemoteCache(self.cache, s.cache_remote, trusted=trusted, signing_key=key, tls_verify=s.cache_tls_verify)

    @cached_property
    def planner(self) -> Planner:
        return Planner(self.settings, self.graph, self.cache, self.store, self.toolchain, self.build_env)

    @cached_property
    def jobserver(self) -> JobServer:
        return JobServer(self.settings.jobs)

    @cached_property
    def executor(self) -> Executor:
        spec = self.settings.executor
        if spec == "local":
            return LocalExecutor(self.cache, self.jobserver, self.variation)
        from hadron.engine.buildkit import BuildKitExecutor, parse_workers

        workers = parse_workers(spec)
        if self.build_env is None:
            raise HadronError("the BuildKit executor runs builds in the locked build environment, and this "
                              "project has none (or [build_env] root is \"host\")",
                              hint="run `hadron buildenv build --update-lock`, or build with --executor local")
        return BuildKitExecutor(self.cache, self.build_env, workers)

    @cached_property
    def images(self) -> dict[str, LoadedImage]:
        found = image_files(self.settings.project / "distro" / "images")
        images = {n: load_image(p, found) for n, p in found.items()}
        for n, img in images.items():
            if img.name != n:
                raise HadronError(f"{img.path}: name: {img.name!r} does not match the file name {n!r}")
            if n in self.recipes:
                raise HadronError(f"{img.path}: image {n!r} has the name of a package; rename one of them")
        return images

    def default_targets(self) -> list[str]:
        """`hadron build` without targets: the default image if the tree defines one, else every package."""
        d = self.settings.default_image
        if d and d in self.images:
            return [d]
        return sorted(self.recipes)
