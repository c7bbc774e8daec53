"""Reproducibility under variation: rebuild targets in a second cache on a varied machine, compare.

The reference is the normal build in the project's cache. The rebuild runs in a fresh cache in a
work directory of its own (so every build's host path differs), with another host name, another
user inside the sandbox, umask 0002, another locale and time zone, and another CPU budget (-j1
against -j2 or more). Sources and the build environment are linked in from the reference cache, so
the rebuild reads the same inputs and fetches nothing. Every package of the closure is compared by
the content digest of its output, every image by its OCI manifest digest; for a package that
differs, diffoscope (Debian) says where. Then every boot artifact of each image (signed UKIs and
disk images, per its boot paths) is made from each build, the second time in another directory
with the varied umask, time zone and locale, and compared by sha256; a difference is located by
GPT partition or PE section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hadron import runner, service
from hadron.boot import artifacts, secureboot
from hadron.context import Context
from hadron.engine.cache import Output
from hadron.engine.sandbox import STANDARD, Variation, base_env
from hadron.errors import BuildError
from hadron.image import oci
from hadron.image.build import BuiltImage
from hadron.layout import CacheLayout

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("diffoscope",)
DIFFOSCOPE_TIMEOUT = 900.0
REPORT_LINES = 40


def varied() -> Variation:
    """The machine a rebuild pretends to be: every property the standard build fixes, changed."""
    return Variation(hostname="repro-variant", uid=1000, umask=0o002,
                     env={"TZ": "<+14>-14", "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"})


def variant_jobs(reference_jobs: int) -> int:
    return 1 if reference_jobs > 1 else 2


@dataclass
class Compared:
    name: str
    kind: str  # "package", "image", "uki" or "disk"
    reference: str  # digest
    rebuilt: str
    diff: str = ""  # diffoscope's report, first lines, when they differ
    report: str = ""  # where the whole report is

    @property
    def identical(self) -> bool:
        return self.reference == self.rebuilt


@dataclass
class ReproReport:
    targets: list[str]
    variation: dict[str, str]
    compared: list[Compared] = field(default_factory=list)
    seconds: float = 0.0
    kept: str = ""

    @property
    def identical(self) -> int:
        return sum(c.identical for c in self.compared)

    @property
    def percent(self) -> float:
        return 100.0 * self.identical / len(self.compared) if self.compared else 100.0

    def doc(self) -> dict[str, Any]:
        return {"targets": self.targets, "variation": self.variation, "identical": self.identical,
                "total": len(self.compared), "percent": round(self.percent, 1), "seconds": round(self.seconds, 1),
                "kept": self.kept,
                "compared": [{"name": c.name, "kind": c.kind, "identical": c.identical, "reference": c.reference,
                              "rebuilt": c.rebuilt, "report": c.report, "diff": c.diff} for c in self.compared]}


def seed(reference: CacheLayout, variant: CacheLayout, env_digest: str | None) -> None:
    """Give the variant cache the reference's verified sources and build environment (hard links,
    read-only for builds), so the rebuild's inputs are the same bytes and nothing is fetched."""
    for src_dir, dst_dir in ((reference.source_objects, variant.source_objects),
                             (reference.source_signatures, variant.source_signatures)):
        if src_dir.is_dir():
            shutil.copytree(src_dir, dst_dir, copy_function=os.link, dirs_exist_ok=True)
    if env_digest is not None:
        src_env = reference.buildenv(env_digest)
        if src_env.is_dir():
            variant.buildenvs.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src_env, variant.buildenv(env_digest), symlinks=True, copy_function=os.link)


def diffoscope(a: Path, b: Path, report: Path) -> str:
    """diffoscope's text report of two trees (written to ``report``); its first lines."""
    res = runner.run(["diffoscope", "--no-progress", "--text", report, "--exclude-directory-metadata", "yes",
                      a, b], what="diffoscope", check=False, timeout=DIFFOSCOPE_TIMEOUT)
    if res.returncode not in (0, 1):
        return f"diffoscope failed (exit status {res.returncode}): {res.stderr.strip()[-500:]}"
    text = report.read_text(errors="replace") if report.is_file() else res.stdout
    return "\n".join(text.splitlines()[:REPORT_LINES])


def _manifest_digest(oci_layout: Path) -> str:
    """The image's manifest digest (its SBOM and provenance refer to it and are not compared: the
    provenance records when the build ran and is signed afresh)."""
    desc, _manifest = oci.image_manifest(oci_layout, oci.only_image_tag(oci_layout))
    return str(desc["digest"])


@contextlib.contextmanager
def varied_process(v: Variation) -> Iterator[None]:
    """This process (and the host programs it runs) with ``v``'s umask, time zone and locale."""
    old_umask = os.umask(v.umask)
    saved = {k: os.environ.get(k) for k in v.env}
    os.environ.update(v.env)
    time.tzset()
    try:
        yield
    finally:
        os.umask(old_umask)
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
        time.tzset()


def verify_repro(ctx: Context, targets: list[str], *, work: Path, keep: Path | None = None,
                 keys: secureboot.KeySet | None = None,
                 say: Callable[[str], None] = lambda _m: None) -> ReproReport:
    """Build ``targets`` normally, rebuild them in a varied second cache under ``work``, compare.
    With ``keys``, also make and compare every boot artifact of every image (signed with them)."""
    t0 = time.monotonic()
    say("reference build (the project's cache)")
    ref = service.build(ctx, targets, quiet=True)
    if not ref.ok:
        raise BuildError("the reference build failed:\n" + service.failures(ref.summary),
                         hint="fix the build first; verify-repro compares two successful builds")
    variant_layout = CacheLayout(work / "cache")
    env = ctx.build_env
    seed(ctx.layout, variant_layout, env.path.name if env is not None else None)
    jobs = variant_jobs(ctx.settings.jobs)
    variation = varied()
    settings = dataclasses.replace(ctx.settings, cache_dir=variant_layout.root, jobs=jobs, offline=True,
                                   cache_remote=None, executor="local")
    vctx = Context(settings, say=ctx.say, variation=variation)
    base = base_env(ctx.settings.source_date_epoch)
    standard = {**STANDARD.describe(), **{k: base[k] for k in variation.env if k in base}}
    report = ReproReport(targets=targets, variation={
        "host build path": f"{ctx.layout.root} -> {variant_layout.root}",
        "jobs": f"{ctx.settings.jobs} -> {jobs}",
        **{k: f"{standard.get(k, '(unset)')} -> {v}" for k, v in variation.describe().items()},
    })
    say("rebuild on a varied machine (" + ", ".join(f"{k}: {v}" for k, v in report.variation.items()) + ")")
    var = service.build(vctx, targets, quiet=True)
    if not var.ok:
        raise BuildError("the varied rebuild failed:\n" + service.failures(var.summary),
                         hint="a build that fails on another host name, user, umask, locale, time zone or "
                         "CPU count depends on it; the log above says where")
    def report_path(name: str) -> Path:
        # Reports outlive the work directory: in --keep's directory, else as the cache's logs.
        p = keep / "diffoscope" / f"{name}.txt" if keep is not None else ctx.layout.log(f"verify-repro-{name}")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.unlink(missing_ok=True)
        return p

    for name in ctx.graph.closure(service.expand_targets(ctx, targets)[0]):
        a, b = ref.summary.results[name].output, var.summary.results[name].output
        assert a is not None and b is not None
        c = Compared(name, "package", a.digest(), b.digest())
        if not c.identical:
            say(f"{name}: differs; diffoscope …")
            path = report_path(name)
            c.report = str(path)
            c.diff = _diff_outputs(a, b, path)
        report.compared.append(c)
    for img_a, img_b in zip(ref.images, var.images, strict=True):
        c = Compared(img_a.name, "image", _manifest_digest(img_a.oci), _manifest_digest(img_b.oci))
        if not c.identical:
            path = report_path(f"image-{img_a.name}")
            c.report = str(path)
            c.diff = diffoscope(img_a.rootfs, img_b.rootfs, path)
        report.compared.append(c)
    if keys is not None:
        for img_a, img_b in zip(ref.images, var.images, strict=True):
            report.compared += compare_boot_artifacts(ctx, img_a, img_b, keys, work, variation, report_path, say)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.move(str(variant_layout.root), str(keep / "cache"))
        for d, name in ((work / "artifacts", "boot-artifacts"), (work / "variant" / "boot-artifacts",
                                                                  "boot-artifacts-variant")):
            if d.is_dir():
                shutil.move(str(d), str(keep / name))
        report.kept = str(keep)
    report.seconds = time.monotonic() - t0
    return report


def compare_boot_artifacts(ctx: Context, img_a: BuiltImage, img_b: BuiltImage, keys: secureboot.KeySet, work: Path,
                           variation: Variation, report_path: Callable[[str], Path],
                           say: Callable[[str], None]) -> list[Compared]:
    """Make the image's boot artifacts from the reference build and, in another directory under
    ``variation``'s umask, time zone and locale, from the rebuild; compare them."""
    boot = ctx.images[img_a.name].spec.boot
    if not boot:
        return []
    say(f"{img_a.name}: boot artifacts ({', '.join(boot)}) from the reference build")
    made_a = artifacts.make_all(img_a, boot, keys, work / "artifacts", epoch=ctx.settings.source_date_epoch)
    say(f"{img_a.name}: boot artifacts from the varied rebuild, in another directory, umask "
        f"{variation.umask:04o}, " + ", ".join(f"{k}={v}" for k, v in sorted(variation.env.items())))
    with varied_process(variation):
        made_b = artifacts.make_all(img_b, boot, keys, work / "variant" / "boot-artifacts",
                                    epoch=ctx.settings.source_date_epoch)
    out = []
    for art_a, art_b in zip(made_a, made_b, strict=True):
        c = Compared(art_a.name, art_a.kind, art_a.digest(), art_b.digest())
        if not c.identical:
            say(f"{art_a.name}: differs; locating …")
            c.diff = "\n".join(artifacts.differences(art_a.kind, art_a.path, art_b.path))
            path = report_path(f"artifact-{art_a.name}")
            path.write_text(c.diff + "\n")
            c.report = str(path)
        out.append(c)
    return out


def _diff_outputs(a: Output, b: Output, report: Path) -> str:
    """diffoscope over the parts of two outputs that are compared: the runtime and dev trees (the
    manifest and the log record times and keys, and are not)."""
    parts = []
    for sub in ("runtime", "dev"):
        if (a.path / sub).is_dir() and (b.path / sub).is_dir():
            part = report.with_name(f"{report.stem}-{sub}.txt")
            head = diffoscope(a.path / sub, b.path / sub, part)
            if head.strip():
                parts.append(f"[{sub}]\n{head}")
                with report.open("a") as out:
                    out.write(part.read_text(errors="replace") if part.is_file() else head)
                part.unlink(missing_ok=True)
    return "\n".join(parts)
