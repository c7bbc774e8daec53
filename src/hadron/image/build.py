"""Build an image target: its packages through the scheduler, then assembly (cached by key)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hadron.context import Context
from hadron.engine.cache import Output, remove_tree
from hadron.errors import HadronError
from hadron.image.assembly import ImageBuild, assemble, image_key
from hadron.image.definition import LoadedImage


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


def images_dir(ctx: Context) -> Path:
    return ctx.settings.cache_dir / "images"


def build_image(ctx: Context, name: str, outputs: dict[str, Output], *, quiet: bool = False) -> BuiltImage:
    image = ctx.images[name]
    names = image_packages(ctx, image)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise HadronError(f"image {name}: packages not built: {', '.join(missing)}")
    order = [n for n in ctx.graph.closure(names) if n in names]
    mine = {n: outputs[n] for n in order}
    key = image_key(image, mine, ctx.toolchain.name, ctx.settings.arch, ctx.settings.source_date_epoch)
    final = images_dir(ctx) / key
    link = ctx.settings.project / "out" / name
    if (final / "image.json").is_file():
        _link(link, final)
        return BuiltImage(name, key, final, json.loads((final / "image.json").read_text()), True)
    versions = {}
    for n in order:
        r = ctx.recipes[n].recipe
        man = mine[n].manifest()
        versions[n] = {"version": r.version, "license": r.license, "summary": r.summary,
                       "sources": [{"url": s["url"], "sha256": s["sha256"]} for s in man.get("sources", [])]}
    work = images_dir(ctx) / f"tmp-{key}.{os.getpid()}"
    if work.exists():
        remove_tree(work)
    work.mkdir(parents=True)
    b = ImageBuild(image=image, outputs=mine, versions=versions, work=work,
                   epoch=ctx.settings.source_date_epoch, arch=ctx.settings.arch)
    t0 = time.monotonic()

    def progress(step: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - t0:7.1f}s] image {name}: {step}", file=sys.stderr, flush=True)

    try:
        record = assemble(b, final, progress)
    except BaseException:
        remove_tree(work)
        raise
    _link(link, final)
    return BuiltImage(name, key, final, record, False)


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
