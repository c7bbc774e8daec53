"""Build an image target: its packages through the scheduler, then assembly (cached by key)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner

from hadron.context import Context
from hadron.engine.cache import IMAGE_RECORD, Output
from hadron.errors import HadronError
from hadron.image.assembly import ImageBuild, assemble, image_key
from hadron.image.definition import LoadedImage
from hadron.trust import keys, sbom


@dataclass(frozen=True)
class BuiltImage:
    name: str
    key: str
    path: Path
    record: dict[str, Any]
    cached: bool

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def oci(self) -> Path:
        return self.path / "oci"

    @property
    def docker_archive(self) -> Path:
        return self.path / "docker-archive.tar"

    @property
    def kernel(self) -> Path:
        return self.rootfs / "boot" / "vmlinuz"


def find_kernel(img: BuiltImage) -> tuple[Path, str]:
    """The image's kernel (/boot/vmlinuz-<release>) and release, or an error saying how to get one."""
    release = str(img.record.get("kernel_release") or "")
    kernel = img.rootfs / "boot" / f"vmlinuz-{release}"
    if not release or not kernel.is_file():
        raise HadronError(f"image {img.name} has no kernel (/boot/vmlinuz-<release>)",
                          hint="set `kernel = ...` in the image definition")
    return kernel, release


def image_packages(ctx: Context, image: LoadedImage) -> list[str]:
    """The image's packages and everything they need at run time (not build-only inputs)."""
    todo = list(image.spec.packages) + ([image.spec.kernel] if image.spec.kernel else [])
    ctx.graph.check_targets(todo)
    seen: list[str] = []
    while todo:
        n = todo.pop(0)
        if n in seen:
            continue
        seen.append(n)
        todo += ctx.graph.run_deps(n)
    return seen


def image_outputs(ctx: Context, name: str, outputs: dict[str, Output]) -> dict[str, Output] | None:
    """The outputs of image ``name``'s packages in dependency order, taken from ``outputs``; None
    when one of them is not there."""
    names = image_packages(ctx, ctx.images[name])
    if any(n not in outputs for n in names):
        return None
    return {n: outputs[n] for n in ctx.graph.closure(names) if n in names}


def _key(ctx: Context, name: str, mine: dict[str, Output]) -> str:
    s = ctx.settings
    signer = provenance_signer(ctx)
    return image_key(ctx.images[name], mine, ctx.toolchain.name, s.arch, s.source_date_epoch,
                     signer.public_key.keyid if signer else None)


def provenance_signer(ctx: Context) -> CryptoSigner | None:
    """The key that signs images' provenance: provenance.key of the key directory ($HADRON_KEYS, else
    keys/ in the project), if there is one; images are built unsigned without it."""
    ks = keys.ImageKeys(keys.project_dir(ctx.settings.project))
    return ks.signer() if ks.has_provenance_key() else None


def current_image_key(ctx: Context, name: str, outputs: dict[str, Output]) -> str | None:
    """The key image ``name`` has with the current definitions and ``outputs`` (package → output,
    e.g. what the planner found cached), or None when one of its packages has no output there.
    ``cache gc`` keeps the images whose keys this returns."""
    mine = image_outputs(ctx, name, outputs)
    return None if mine is None else _key(ctx, name, mine)


def build_image(ctx: Context, name: str, outputs: dict[str, Output], *, quiet: bool = False) -> BuiltImage:
    """Image ``name`` made of ``outputs``: found in the cache, or assembled and published there.

    A cache hit takes no lock and hashes nothing. On a miss the image key's lock is taken; the
    image may have been published meanwhile by another process, else it is assembled in a private
    directory and published with one rename. A published image directory is never deleted or
    replaced, so a process reading one is never disturbed."""
    mine = image_outputs(ctx, name, outputs)
    if mine is None:
        missing = [n for n in image_packages(ctx, ctx.images[name]) if n not in outputs]
        raise HadronError(f"image {name}: packages not built: {', '.join(missing)}",
                          hint=f"build them first: hadron build {' '.join(missing)}")
    key = _key(ctx, name, mine)
    built = published_image(ctx, name, key)
    if built is None:
        with ctx.cache.image_lock(key):
            built = published_image(ctx, name, key) or assemble_image(
                ctx, name, key, mine, everything=outputs, quiet=quiet)
    _link(ctx.settings.project / "out" / name, built.path)
    return built


def published_image(ctx: Context, name: str, key: str) -> BuiltImage | None:
    """Image ``name`` with key ``key`` if it is in the cache (reads its record, nothing else)."""
    path = ctx.cache.image(key)
    if path is None:
        return None
    return BuiltImage(name, key, path, json.loads((path / IMAGE_RECORD).read_text()), True)


def assemble_image(ctx: Context, name: str, key: str, mine: dict[str, Output], *,
                   everything: dict[str, Output] | None = None, quiet: bool = False) -> BuiltImage:
    """Assemble image ``name`` (key ``key``) from ``mine`` in a private directory and publish it.
    Call with the image key's lock held. If the key is published already (by a process that did
    not take the lock), this assembly is discarded and the published image returned. ``everything``:
    the outputs the image's packages were built with (default ``mine``), for the SBOM and provenance."""
    everything = everything if everything is not None else mine
    image = ctx.images[name]
    t0 = time.monotonic()

    def progress(step: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - t0:7.1f}s] image {name}: {step}", file=sys.stderr, flush=True)

    components = [_component(ctx, n, out) for n, out in mine.items()]
    inputs = {n: d for c in components for n, d in c.inputs.items() if n not in mine}
    build_inputs = [_component(ctx, n, everything[n]) for n in sorted(inputs)
                    if n in everything and everything[n].digest() == inputs[n]]
    envs = {str(out.manifest().get("build_env")) for out in mine.values() if out.manifest().get("build_env")}
    with ctx.cache.image_staging(key) as work:
        b = ImageBuild(image=image, outputs=mine, versions=_versions(ctx, mine), work=work,
                       epoch=ctx.settings.source_date_epoch, arch=ctx.settings.arch, components=components,
                       build_inputs=build_inputs, build_env=min(envs) if len(envs) == 1 else None,
                       signer=provenance_signer(ctx), key=key, toolchain=ctx.toolchain)
        record = assemble(b, progress)
        progress("manifest")
        path, ours = ctx.cache.publish_image(key, work)
    if not ours:  # published meanwhile by a process that did not take the lock: that one counts
        return BuiltImage(name, key, path, json.loads((path / IMAGE_RECORD).read_text()), True)
    return BuiltImage(name, key, path, record, False)


def _versions(ctx: Context, mine: dict[str, Output]) -> dict[str, dict[str, Any]]:
    """Per package: version, license, summary and sources, for the image's component manifest."""
    versions = {}
    for n, out in mine.items():
        r = ctx.recipes[n].recipe
        man = out.manifest()
        versions[n] = {"version": r.version, "license": r.license, "summary": r.summary,
                       "sources": [{"url": s["url"], "sha256": s["sha256"]} for s in man.get("sources", [])]}
    return versions


def _component(ctx: Context, name: str, out: Output) -> sbom.Component:
    """Package ``name`` as the SBOM and provenance name it: from its recipe and its output's manifest."""
    man = out.manifest()
    r = ctx.recipes[name].recipe if name in ctx.recipes else None
    return sbom.Component(
        name=name, version=str(man.get("version") or (r.version if r else "")),
        license=r.license if r else str(man.get("license") or "NOASSERTION"),
        homepage=r.homepage if r else "NOASSERTION", output=out.digest(),
        sources=tuple(sbom.Source(str(s["url"]), str(s["sha256"])) for s in man.get("sources", [])),
        inputs={str(k): str(v) for k, v in man.get("inputs", {}).items()})


def _link(link: Path, target: Path) -> None:
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        if tmp.is_symlink():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)
    except OSError:
        pass  # a read-only checkout: the cache path is printed anyway
