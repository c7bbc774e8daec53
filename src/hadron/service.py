"""The build service: the one way every verb that builds (build, fetch, boot, push, image …) turns
targets into built packages and images, with the same options (``Settings``: jobs, offline,
keep-going, checks) and the same defaults.

Steps: expand image targets into their packages, resolve what is cached, and when anything is left
to build check that the host can isolate build steps and run the scheduler; then assemble the
images whose packages all built.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from hadron import host, noop
from hadron.config import Settings, load_settings
from hadron.context import Context
from hadron.engine import sandbox
from hadron.engine.progress import Reporter
from hadron.engine.scheduler import Result, Scheduler, Summary
from hadron.errors import BuildError, HadronError
from hadron.image.build import BuiltImage, build_image, image_packages


@dataclass
class Outcome:
    summary: Summary
    images: list[BuiltImage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.summary.ok


def expand_targets(ctx: Context, targets: list[str]) -> tuple[list[str], list[str]]:
    """(packages, images) for TARGETS (default: the default image): every image replaced by the
    packages it contains. Unknown names are an error."""
    names = targets or ctx.default_targets()
    images = [n for n in names if n in ctx.images]
    packages: list[str] = []
    for n in names:
        for p in image_packages(ctx, ctx.images[n]) if n in ctx.images else [n]:
            if p not in packages:
                packages.append(p)
    ctx.graph.check_targets(packages)
    return packages, images


def build_packages(ctx: Context, packages: list[str], *, quiet: bool = False) -> Summary:
    """Build ``packages`` and what they need; a no-op (everything cached) starts no sandbox."""
    outputs, keys = ctx.planner.resolve_cached(packages)
    closure = ctx.graph.closure(packages)
    if all(n in outputs for n in closure):
        summary = Summary()
        for n in closure:
            summary.results[n] = Result(n, "cached", keys[n], outputs[n], log=str(outputs[n].log))
        return summary
    sandbox.check_isolation()
    sched = Scheduler(ctx.planner, ctx.executor, ctx.store, ctx.mirrors, lambda total: Reporter(total, quiet=quiet),
                      remote=ctx.remote, push=ctx.settings.cache_push)
    return sched.run(packages, run_check=ctx.settings.check)


def push_outputs(ctx: Context, targets: list[str]) -> dict[str, str]:
    """Sign and push the cached outputs of TARGETS' packages; returns package -> manifest digest."""
    if ctx.remote is None:
        raise HadronError("no remote cache is configured", hint="set [cache] remote in hadron.toml "
                          "(a registry repository) or $HADRON_CACHE_REMOTE")
    packages, _images = expand_targets(ctx, targets or ctx.default_targets())
    order = ctx.graph.closure(packages)
    outputs, _keys = ctx.planner.resolve_cached(order)
    missing = [n for n in order if n not in outputs]
    if missing:
        raise HadronError(f"not built yet: {', '.join(missing)}", hint="run `hadron build` first")
    return {n: ctx.remote.push(outputs[n]) for n in order}


def build(ctx: Context, targets: list[str], *, quiet: bool = False) -> Outcome:
    """Build TARGETS (packages and images; default: the default image)."""
    packages, images = expand_targets(ctx, targets)
    summary = build_packages(ctx, packages, quiet=quiet)
    out = Outcome(summary)
    if summary.ok:
        outputs = {n: r.output for n, r in summary.results.items() if r.output is not None}
        out.images = [build_image(ctx, img, outputs, quiet=quiet) for img in images]
    return out


def image_name(ctx: Context, name: str | None) -> str:
    """The image a verb works on: ``name`` or the default image, which must exist."""
    img = name or ctx.settings.default_image
    if not img or img not in ctx.images:
        raise HadronError(f"unknown image {img!r}", hint="images: " + (", ".join(sorted(ctx.images)) or "(none)"))
    return img


def build_one_image(ctx: Context, name: str | None, *, quiet: bool = False) -> BuiltImage:
    """Build one image (default: the default image) for a verb that then uses it."""
    img = image_name(ctx, name)
    out = build(ctx, [img], quiet=quiet)
    if not out.ok:
        raise BuildError(f"image {img}: packages failed to build:\n" + failures(out.summary),
                         hint="fix the first failure named above (its log says why), then run the command again")
    return out.images[0]


def failures(summary: Summary) -> str:
    return "\n".join(f"  {r.name}: {r.error} (log: {r.log})" for r in summary.failed)


def check_boot_path(ctx: Context, name: str | None, boot_path: str) -> None:
    """Refuse an image that does not carry ``boot_path``, naming the images that do."""
    spec = ctx.images[image_name(ctx, name)].spec
    if boot_path not in spec.boot:
        carriers = sorted(n for n, i in ctx.images.items() if boot_path in i.spec.boot)
        raise HadronError(f"image {spec.name} does not carry the {boot_path} boot path (its boot = {spec.boot})",
                          hint=f"images that do: {', '.join(carriers) or 'none'}")


def result_doc(outcome: Outcome, seconds: float) -> dict[str, Any]:
    """The result of a build as the CLI prints it (``--json``) and the no-op memo records it."""
    s = outcome.summary
    return {
        "ok": outcome.ok,
        "seconds": round(seconds, 3),
        "images": {i.name: {"path": str(i.path), "key": i.key, "cached": i.cached, "oci_layout": str(i.oci),
                            "docker_archive": str(i.docker_archive), **i.record} for i in outcome.images},
        "packages": {
            n: {"status": r.status, "key": r.key, "log": r.log, "error": r.error, "remote": r.remote,
                "output": str(r.output.path) if r.output else None}
            for n, r in s.results.items()
        },
    }


def build_request(req: noop.Request, *, jobs: int | None = None, offline: bool = False, keep_going: bool = True,
                  check: bool = True, quiet: bool = False, executor: str = "local") -> dict[str, Any]:
    """`hadron build`: answered by the no-op memo when nothing changed, else built (and remembered)."""
    t0 = time.monotonic()
    doc = noop.answer(req)
    if doc is not None:
        doc["seconds"] = round(time.monotonic() - t0, 3)
        return doc
    settings = load_settings(project=req.project, extra_recipes=list(req.recipes), toolchain=req.toolchain,
                             cache_dir=req.cache_dir, jobs=jobs, offline=offline, keep_going=keep_going,
                             check=check, executor=executor)
    watch = watch_inputs(settings)  # before anything is read: an edit during the build is a change
    ctx = Context(settings)
    outcome = build(ctx, list(req.targets), quiet=quiet)
    doc = result_doc(outcome, time.monotonic() - t0)
    workers = getattr(ctx.executor, "used", None)
    if workers is not None:
        doc["workers"] = workers
    if outcome.ok:
        remember(ctx, req, watch, outcome, doc)
    else:
        noop.forget(req)
    return doc


def watch_inputs(s: Settings) -> noop.Watch:
    """Stamps of the build's inputs (recipes, images, toolchain profiles, Hadron's code, configuration,
    the provenance key, the host's release), taken before the build reads them."""
    from hadron.trust import keys as trust_keys

    watch = noop.Watch(host.sandbox_path(s.extra_path))
    for d in s.recipe_dirs:
        watch.tree(d)
    for sub in ("images", "toolchains"):
        watch.tree(s.project / "distro" / sub)
    watch.code()
    watch.file(s.project / "hadron.toml")
    watch.file(s.project / "buildenv.lock")
    watch.file(trust_keys.project_dir(s.project) / trust_keys.PROVENANCE_KEY)  # signs images' provenance
    if "HADRON_CONFIG" in os.environ:
        watch.file(os.environ["HADRON_CONFIG"])
    for p in host.OS_RELEASE:
        watch.file(p)
    watch.tools.update(host.BASE_HOST_TOOLS)
    return watch


def remember(ctx: Context, req: noop.Request, watch: noop.Watch, outcome: Outcome, doc: dict[str, Any]) -> None:
    """Record everything ``doc`` was derived from (see :mod:`hadron.noop`): ``watch`` holds the inputs'
    stamps from before the build; the outputs, sources and host tools it used are added now."""
    s = ctx.settings
    for n, r in outcome.summary.results.items():
        assert r.output is not None
        watch.file(r.output.path / "digest")
        watch.tools.update(ctx.planner.host_tools(n))
        for src in ctx.recipes[n].recipe.sources:
            for digest in src.digests():  # the first one in the store decided the key
                watch.file(ctx.store.path(digest))
                if ctx.store.has(digest):
                    break
    for img in outcome.images:
        watch.file(img.path / "image.json")
        watch.file(s.project / "out" / img.name)
    cached = json.loads(json.dumps(doc))
    for p in cached["packages"].values():
        p["status"] = "cached"
    for i in cached["images"].values():
        i["cached"] = True
    noop.remember(req, watch, cached)


@dataclass(frozen=True)
class Keep:
    outputs: set[str]
    images: set[str]


def current_keys(ctx: Context, targets: list[str] | None) -> Keep:
    """The output and image keys the current recipes and images produce: for every package and image
    (``targets`` None), or for TARGETS and what they need. Only keys whose inputs are cached are known;
    an output whose inputs are gone cannot be current."""
    from hadron.image.build import current_image_key

    if targets is None:
        packages, images = sorted(ctx.recipes), sorted(ctx.images)
    else:
        packages, images = expand_targets(ctx, targets)
    outputs, keys = ctx.planner.resolve_cached(packages)
    image_keys = {k for n in images if (k := current_image_key(ctx, n, outputs)) is not None}
    return Keep(set(keys.values()), image_keys)


def toolchain_profiles(ctx: Context) -> list[str]:
    return sorted(p.stem for p in (ctx.settings.project / "distro" / "toolchains").glob("*.toml"))


def host_requirements(ctx: Context, images: list[str]) -> dict[str, dict[str, tuple[bool, list[str]]]]:
    """stage → host program or file → (present, who needs it), for building ``images`` with ctx's
    toolchain profile, assembling them, and writing and booting their disks on every boot path they
    carry. Build steps look programs up on the sandbox's PATH, the other stages on this process's."""
    from hadron.boot import grub, immutable, qemu, trusted
    from hadron.image import assembly, oci
    from hadron.lifecycle import sysext, sysext_check, update, update_check

    stages: dict[str, dict[str, tuple[bool, list[str]]]] = {}

    def need(stage: str, names: tuple[str, ...] | list[str], who: str, search: str | None = None) -> None:
        tools = stages.setdefault(stage, {})
        for t in names:
            ok, whos = tools.get(t, (host.present(t, search), []))
            if who not in whos:
                whos.append(who)
            tools[t] = (ok, whos)

    from hadron.engine import buildenv
    from hadron.engine.scheduler import recipe_host_tools
    from hadron.trust import repro

    build_path = host.sandbox_path(ctx.settings.extra_path)
    # With a locked environment, build steps run inside it (made from the table's build-environment
    # rows): the host needs what makes or fetches it, not the compilers.
    locked = ctx.settings.env_root == "lock" and buildenv.read_lock(ctx.settings.project) is not None
    for name in images:
        packages, _ = expand_targets(ctx, [name])
        for n in ctx.graph.closure(packages):
            for src in ctx.recipes[n].recipe.sources:
                if src.signature is not None:
                    need("fetch (upstream signatures)",
                         ("sqv",) if src.signature.legacy is None else ("gpgv", "gpg"), n)
        if locked:
            need("build environment (buildenv.lock)", buildenv.HOST_TOOLS, name)
        else:
            for n in ctx.graph.closure(packages):
                need(f"build ({ctx.toolchain.name} toolchain)",
                     [*host.BASE_HOST_TOOLS, *recipe_host_tools(ctx.recipes[n].recipe, ctx.toolchain)], n, build_path)
        need("build (sandbox)", sandbox.HOST_TOOLS, name)
        need("image assembly", [*assembly.HOST_TOOLS, *oci.HOST_TOOLS], name)
        need("hadron verify-repro", repro.HOST_TOOLS, name)
        spec = ctx.images[name].spec
        if spec.kernel:
            need("boot (direct kernel)", qemu.DIRECT_BOOT_NEEDS, name)
        for path in spec.boot:
            need(f"boot path {path}", {"grub": grub.HOST_NEEDS, "trusted": trusted.HOST_NEEDS,
                                          "immutable": (*immutable.HOST_NEEDS, *sysext.HOST_TOOLS,
                                                        *sysext_check.HOST_TOOLS, *update.HOST_TOOLS,
                                                        *update_check.HOST_TOOLS)}[path], name)
    return stages
