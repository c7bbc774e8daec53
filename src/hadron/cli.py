"""The ``hadron`` command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from hadron import __version__
from hadron.boot import qemu
from hadron.config import load_settings
from hadron.context import Context
from hadron.engine import sandbox
from hadron.engine.cache import tree_size
from hadron.engine.fetch import fetch_recipe
from hadron.engine.progress import Reporter
from hadron.engine.scheduler import Result, Scheduler, Summary
from hadron.errors import HadronError, RecipeError
from hadron.image import oci
from hadron.image.build import BuiltImage, build_image, image_packages

F = TypeVar("F", bound=Callable[..., Any])
KEYS_HELP = "Key directory made by `hadron keys generate` (default $HADRON_KEYS or ./keys)."


def _keys_dir(keys: Path | None) -> Path:
    return keys or Path(os.environ.get("HADRON_KEYS", "keys"))


def _common(f: F) -> F:
    f = click.option("--recipes", "recipes", multiple=True, type=click.Path(path_type=Path, file_okay=False),
                     help="Extra recipe directory; adds or overrides recipes by name (repeatable).")(f)
    f = click.option("--toolchain", default=None, help="Toolchain profile (default from hadron.toml).")(f)
    f = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Cache root (default $HADRON_CACHE or ~/.cache/hadron).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    return f


def _ctx(recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None, **kw: Any) -> Context:
    return Context(load_settings(extra_recipes=list(recipes), toolchain=toolchain, cache_dir=cache_dir, **kw))


def _guard(f: F) -> F:
    """Print user errors as `error: …` plus a hint, never as a traceback."""

    @wraps(f)
    def inner(*a: Any, **kw: Any) -> Any:
        try:
            return f(*a, **kw)
        except RecipeError as e:
            click.echo("error: " + e.message, err=True)
            sys.exit(2)
        except HadronError as e:
            click.echo(f"error: {e.message}", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return inner  # type: ignore[return-value]


@click.group()
@click.version_option(__version__)
def main() -> None:
    """Build Hadron from declarative recipes: verified sources, sandboxed steps, cached outputs."""


@main.command()
@click.argument("targets", nargs=-1)
@_common
@click.option("-j", "--jobs", type=click.IntRange(1, 1024), default=None, help="CPU budget (default: cores).")
@click.option("--offline", is_flag=True, help="Use only sources already in the store.")
@click.option("--keep-going/--fail-fast", default=True, show_default=True,
              help="After a failure, keep building packages that do not depend on it.")
@click.option("--no-check", is_flag=True, help="Skip the recipes' check steps.")
@_guard
def build(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
          as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool) -> None:
    """Build TARGETS (packages or images; default: the default image of hadron.toml) and what they need."""
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going)
    names = list(targets) or ctx.default_targets()
    image_names = [n for n in names if n in ctx.images]
    packages = _expand_images(ctx, names)
    ctx.graph.check_targets(packages)
    summary = run_build(ctx, packages, run_check=not no_check, quiet=as_json)
    built: list[BuiltImage] = []
    if summary.ok:
        outputs = {n: r.output for n, r in summary.results.items() if r.output is not None}
        built = [build_image(ctx, img, outputs, quiet=as_json) for img in image_names]
    _report(summary, as_json, built)
    sys.exit(0 if summary.ok else 1)


def _expand_images(ctx: Context, names: list[str]) -> list[str]:
    """Targets with every image replaced by the packages it contains."""
    out: list[str] = []
    for n in names:
        for p in image_packages(ctx, ctx.images[n]) if n in ctx.images else [n]:
            if p not in out:
                out.append(p)
    return out


def run_build(ctx: Context, names: list[str], *, run_check: bool = True, quiet: bool = False) -> Summary:
    outputs, keys = ctx.planner.resolve_cached(names)
    closure = ctx.graph.closure(names)
    if all(n in outputs for n in closure):  # fast path: nothing to do, no sandbox needed
        summary = Summary()
        for n in closure:
            summary.results[n] = Result(n, "cached", keys[n], outputs[n], log=str(outputs[n].log))
        return summary
    sandbox.check_isolation()
    sched = Scheduler(ctx.planner, ctx.executor, ctx.store, ctx.mirrors,
                      lambda total: Reporter(total, quiet=quiet))
    return sched.run(names, run_check=run_check)


def _report(summary: Summary, as_json: bool, images: list[BuiltImage] | None = None) -> None:
    images = images or []
    if as_json:
        click.echo(json.dumps({
            "ok": summary.ok,
            "seconds": round(summary.seconds, 3),
            "images": {i.name: {"path": str(i.path), "key": i.key, "cached": i.cached, **i.record} for i in images},
            "packages": {
                n: {"status": r.status, "key": r.key, "log": r.log, "error": r.error,
                    "output": str(r.output.path) if r.output else None}
                for n, r in summary.results.items()
            },
        }, indent=2))
        return
    counts = ", ".join(f"{summary.count(s)} {s}" for s in ("built", "cached", "failed", "skipped") if summary.count(s))
    click.echo(f"{len(summary.results)} packages: {counts} ({summary.seconds:.1f}s)", err=True)
    for r in summary.failed:
        click.echo(f"FAILED {r.name}: {r.error}\n  log: {r.log}", err=True)
    for i in images:
        rec = i.record
        click.echo(f"image {i.name} {rec['version']}{' (cached)' if i.cached else ''}: {i.path}\n"
                   f"  rootfs {rec['rootfs_bytes'] / 1e6:.1f} MB, OCI layer {rec['oci']['layer_size'] / 1e6:.1f} MB "
                   f"compressed, manifest {rec['oci']['manifest']}\n"
                   f"  OCI layout: {i.oci}\n  docker archive: {i.docker_archive}", err=True)


@main.command()
@click.argument("targets", nargs=-1)
@_common
@click.option("--offline", is_flag=True, help="Only check that the sources are in the store.")
@_guard
def fetch(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
          as_json: bool, offline: bool) -> None:
    """Download and verify the sources of TARGETS and their dependencies (default: all)."""
    ctx = _ctx(recipes, toolchain, cache_dir, offline=offline)
    names = ctx.graph.closure(_expand_images(ctx, list(targets) or ctx.default_targets()))
    failures: list[str] = []
    report: dict[str, list[dict[str, str]]] = {}
    for n in names:
        try:
            got = fetch_recipe(ctx.store, ctx.recipes[n], ctx.mirrors, offline=offline, upstream=ctx.settings.upstream)
        except HadronError as e:
            failures.append(str(e))
            continue
        report[n] = [{"file": f.source.name, "sha256": f.digest, "from": f.origin, "path": str(f.path)} for f in got]
        if not as_json:
            for f in got:
                click.echo(f"{n}: {f.source.name} ok ({f.origin})", err=True)
    if as_json:
        click.echo(json.dumps({"ok": not failures, "sources": report, "errors": failures}, indent=2))
    for msg in failures:
        click.echo(f"error: {msg}", err=True)
    sys.exit(1 if failures else 0)


@main.command()
@click.argument("target", required=False)
@_common
@click.option("--dot", is_flag=True, help="Graphviz output.")
@_guard
def graph(target: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
          as_json: bool, dot: bool) -> None:
    """Show the dependency tree of TARGET (default: every package)."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    g = ctx.graph
    targets = [target] if target else sorted(ctx.recipes)
    if target in ctx.images:
        targets = image_packages(ctx, ctx.images[target])
        if not dot and not as_json:
            click.echo(f"{target} (image: {', '.join(targets)})")
            for t in ctx.images[target].spec.packages + [k for k in [ctx.images[target].spec.kernel] if k]:
                click.echo(g.tree(t))
            return
    if dot:
        click.echo(g.dot(targets))
    elif as_json:
        names = g.closure(targets)
        click.echo(json.dumps({n: {"build": g.build_deps(n), "run": g.run_deps(n)} for n in names}, indent=2))
    elif target:
        click.echo(g.tree(target))
    else:
        rev = g.reverse_deps()
        roots = [n for n in g.closure(targets) if not rev[n]]
        for r in roots:
            click.echo(g.tree(r))


@main.command()
@click.argument("package")
@_common
@_guard
def show(package: str, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
         as_json: bool) -> None:
    """Show PACKAGE's resolved recipe, cache key and state, and log path."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    ctx.graph.check_targets([package])
    lr = ctx.recipes[package]
    outputs, keys = ctx.planner.resolve_cached([package])
    key = keys.get(package)
    out = outputs.get(package)
    info: dict[str, Any] = {
        "recipe_file": str(lr.path),
        "recipe": lr.normalized(),
        "build_inputs": ctx.planner.inputs(package),
        "toolchain": ctx.toolchain.name,
        "key": key,
        "cached": out is not None,
        "output": str(out.path) if out else None,
        "log": str(out.log) if out else str(ctx.cache.log_path(package)),
    }
    if key is None:
        info["key_note"] = "unknown until the package's inputs are built"
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{package} {lr.recipe.version} — {lr.recipe.summary}")
    click.echo(f"  recipe:  {lr.path}")
    click.echo(f"  inputs:  {', '.join(info['build_inputs']) or '(none)'}")
    click.echo(f"  key:     {key or 'unknown (inputs not built yet)'}")
    click.echo(f"  cached:  {'yes, ' + str(out.path) if out else 'no'}")
    click.echo(f"  log:     {info['log']}")
    click.echo("  resolved recipe:")
    click.echo("    " + json.dumps(info["recipe"], indent=2).replace("\n", "\n    "))


@main.group()
def cache() -> None:
    """Inspect and maintain the output cache."""


@cache.command("verify")
@_common
@_guard
def cache_verify(recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None, as_json: bool) -> None:
    """Re-hash every cached output and source against its manifest."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    problems: list[str] = []
    outs = ctx.cache.all_outputs()
    for out in outs:
        problems += ctx.cache.verify(out)
    bad_sources = ctx.store.verify()
    problems += [f"{ctx.store.path(d)}: content does not match its sha256 name" for d in bad_sources]
    if as_json:
        click.echo(json.dumps({"outputs": len(outs), "problems": problems}, indent=2))
    else:
        for p in problems:
            click.echo(f"CORRUPT {p}", err=True)
        click.echo(f"{len(outs)} outputs checked, {len(problems)} problem(s)", err=True)
        if problems:
            click.echo("hint: delete the named output directory; "
                       "the next build recreates it", err=True)
    sys.exit(1 if problems else 0)


@cache.command("gc")
@_common
@click.option("--keep-all-current/--only-targets", default=True,
              help="Keep outputs of every package of the current recipes (default) or only TARGETS'.")
@click.argument("targets", nargs=-1)
@_guard
def cache_gc(recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None, as_json: bool,
             keep_all_current: bool, targets: tuple[str, ...]) -> None:
    """Delete outputs the current recipes no longer produce, and leftovers of interrupted builds."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    names = list(targets) or ctx.default_targets()
    _outs, keys = ctx.planner.resolve_cached(names)
    keep = set(keys.values())
    before = tree_size(ctx.cache.root) if ctx.cache.root.exists() else 0
    count, freed = ctx.cache.gc(keep)
    if as_json:
        click.echo(json.dumps({"removed": count, "bytes_freed": freed, "kept": len(keep)}))
    else:
        click.echo(f"removed {count} entr{'y' if count == 1 else 'ies'}, freed {freed / 1e6:.1f} MB "
                   f"of {before / 1e6:.1f} MB; kept {len(keep)} outputs", err=True)


def _check_boot_path(ctx: Context, name: str | None, boot_path: str) -> None:
    img = name or ctx.settings.default_image
    spec = ctx.images[img].spec if img in ctx.images else None
    if spec is not None and boot_path not in spec.boot:
        carriers = sorted(n for n, i in ctx.images.items() if boot_path in i.spec.boot)
        raise HadronError(f"image {img} does not carry the {boot_path} boot path (its boot = {spec.boot})",
                          hint=f"images that do: {', '.join(carriers) or 'none'}")


def _built_image(ctx: Context, name: str | None, quiet: bool) -> BuiltImage:
    img = name or ctx.settings.default_image
    if not img or img not in ctx.images:
        raise HadronError(f"unknown image {img!r}", hint="images: " + (", ".join(sorted(ctx.images)) or "(none)"))
    packages = image_packages(ctx, ctx.images[img])
    summary = run_build(ctx, packages, quiet=quiet)
    if not summary.ok:
        _report(summary, False)
        raise HadronError(f"image {img}: packages failed to build")
    outputs = {n: r.output for n, r in summary.results.items() if r.output is not None}
    return build_image(ctx, img, outputs, quiet=quiet)


@main.command()
@click.argument("image", required=False)
@_common
@click.option("--check", is_flag=True,
              help="Non-interactive: report the state after multi-user.target, then power off; exit 1 unless "
                   "the system is running with zero failed units.")
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait with --check.")
@click.option("--append", default="", help="Extra kernel command line.")
@click.option("--trusted", is_flag=True,
              help="Boot the trusted disk (systemd-boot + signed UKI) with OVMF enforcing Secure Boot with our keys "
                   "enrolled and a TPM 2.0 (swtpm); --check also compares PCR 11 with the UKI's prediction.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--grub", "grub_firmware", type=click.Choice(["bios", "uefi"]), default=None,
              help="Boot the GRUB disk (image disk --boot grub) with SeaBIOS (bios) or OVMF (uefi).")
@_guard
def boot(image: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
         as_json: bool, check: bool, timeout: float, append: str, trusted: bool, keys_dir: Path | None,
         grub_firmware: str | None) -> None:
    """Boot IMAGE (default: the default image) in QEMU with the serial console on this terminal."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    if trusted and grub_firmware:
        raise HadronError("--trusted and --grub are two different disks", hint="give one of them")
    if trusted or grub_firmware:
        _check_boot_path(ctx, image, "trusted" if trusted else "grub")
    built = _built_image(ctx, image, quiet=as_json)
    if grub_firmware:
        _boot_grub(ctx, built, grub_firmware, check=check, timeout=timeout, append=append, as_json=as_json)
    if trusted:
        _boot_trusted(ctx, built, keys_dir, check=check, timeout=timeout, append=append, as_json=as_json)
    if not built.kernel.exists():
        raise HadronError(f"image {built.name} has no kernel (/boot/vmlinuz)",
                          hint=f"set `kernel = ...` in {ctx.images[built.name].path}")
    disk = built.path / ("check.ext4" if check else "disk.ext4")
    if check or not disk.exists():
        qemu.make_disk(built.rootfs, disk, check=check)
    if not check:
        sys.exit(qemu.interactive(built.kernel, disk, append))
    res = qemu.boot(built.kernel, disk, timeout=timeout, echo=not as_json, append=append)
    disk.unlink()
    _report_boot(built.name, res, {}, ok=res.ok, as_json=as_json)


def _report_boot(name: str, res: qemu.BootResult, extra: dict[str, Any], *, ok: bool, as_json: bool) -> None:
    info: dict[str, Any] = {"image": name, "state": res.state, "failed_units": res.failed, "ok": ok,
                            "seconds_to_multi_user": res.seconds_to_check,
                            "seconds_total": round(res.seconds_total, 1), **extra}
    if not ok:
        info["console_tail"] = res.console[-8000:]
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        t = f"{res.seconds_to_check:.1f}s" if res.seconds_to_check else "never"
        more = "".join(f" {k}={v}" for k, v in extra.items())
        click.echo(f"\nboot check: state={res.state} failed={res.failed or 'none'}; "
                   f"multi-user.target reached after {t} (QEMU start to report){more}", err=True)
    sys.exit(0 if ok else 1)


def _boot_grub(ctx: Context, built: BuiltImage, firmware: str, *, check: bool, timeout: float, append: str,
               as_json: bool) -> None:
    import tempfile

    from hadron.boot import grub as grubboot

    tmp_root = ctx.settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="grub-boot-", dir=tmp_root) as td:
        work = Path(td)
        g = grubboot.build_grub_disk(built, work / "disk.raw", check=check, cmdline_extra=append,
                                     log=ctx.settings.cache_dir / "logs" / f"{built.name}-grub-disk.log")
        if not check:
            sys.exit(qemu.interactive_disk(g.path, firmware))
        res = qemu.boot_disk(g.path, firmware, timeout=timeout, echo=not as_json)
    _report_boot(built.name, res, {"firmware": firmware, "disk_bytes": g.size, "initramfs_bytes": g.initramfs_size},
                 ok=res.ok, as_json=as_json)


def _boot_trusted(ctx: Context, built: BuiltImage, keys_dir: Path | None, *, check: bool, timeout: float,
                  append: str, as_json: bool) -> None:
    import tempfile

    from hadron.boot import secureboot
    from hadron.boot import trusted as bootimage

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    tmp_root = ctx.settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trusted-boot-", dir=tmp_root) as td:
        work = Path(td)
        d = bootimage.build_trusted_disk(built, ks, work / "disk.raw", check=check, cmdline_extra=append,
                                         epoch=ctx.settings.source_date_epoch)
        store = work / "OVMF_VARS.fd"
        secureboot.enroll_ovmf_vars(ks, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
        if not check:
            sys.exit(qemu.interactive_disk(work / "disk.raw", "secure-boot", vars_file=store, tpm=True))
        res = qemu.boot_disk(work / "disk.raw", "secure-boot", vars_file=store, tpm=True, timeout=timeout,
                             echo=not as_json)
    expected = bootimage.expected_booted_pcr11(d.uki)
    # The policy check: a PolicyPCR session in the booted state must be one the UKI's .pcrsig signed.
    signed = res.pcr11 is not None and bootimage.policy_covers(d.uki, res.pcr11, ks.pcr_public_key)
    ok = res.ok and res.pcr11 == expected and signed
    _report_boot(built.name, res, {"pcr11": res.pcr11, "pcr11_expected": expected, "pcr11_policy_signed": signed,
                                   "disk_bytes": d.size, "uki_bytes": d.uki.size}, ok=ok, as_json=as_json)


@main.command()
@click.argument("ref")
@click.option("--image", "image", default=None, help="Image to push (default: the default image).")
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@_common
@_guard
def push(ref: str, image: str | None, tls_verify: bool, recipes: tuple[Path, ...], toolchain: str | None,
         cache_dir: Path | None, as_json: bool) -> None:
    """Push the image to an OCI registry as REF (e.g. registry.example/hadron/core:0.1)."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    built = _built_image(ctx, image, quiet=as_json)
    oci.push(built.oci, built.record["version"], ref, tls_verify=tls_verify)
    click.echo(json.dumps({"pushed": ref, "manifest": built.record["oci"]["manifest"]}) if as_json
               else f"pushed {built.name} to {ref} ({built.record['oci']['manifest']})")


@main.group()
def keys() -> None:
    """Secure Boot and TPM policy signing keys."""


@keys.command("generate")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing key directory.")
@_guard
def keys_generate(directory: Path | None, force: bool) -> None:
    """Create TEST keys: PK, KEK and db (key, certificate, ESL, signed .auth) and the PCR 11 policy key."""
    from hadron.boot import secureboot

    ks = secureboot.generate_keys(_keys_dir(directory), force=force)
    click.echo(f"test keys written to {ks.directory} (PK, KEK, db, TPM PCR policy key); do not ship them")


@main.group()
def image() -> None:
    """Bootable artifacts made from a built image (UKI, disk images)."""


@image.command("uki")
@click.argument("name", required=False)
@_common
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the UKI (default out/IMAGE.efi).")
@_guard
def image_uki(name: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
              as_json: bool, keys_dir: Path | None, output: Path | None) -> None:
    """Assemble the image's signed Unified Kernel Image (PCR 11 policy signed, Secure Boot signed)."""
    from hadron.boot import secureboot
    from hadron.boot import trusted as bootimage

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir)
    built = _built_image(ctx, name, quiet=as_json)
    out = output or ctx.settings.project / "out" / f"{built.name}.efi"
    info = bootimage.build_signed_uki(built, ks, out, epoch=ctx.settings.source_date_epoch)
    doc = {"uki": str(out), "bytes": out.stat().st_size, "sections": list(info.written), "pcr11": info.pcr11}
    click.echo(json.dumps(doc, indent=2) if as_json else f"UKI {out} ({out.stat().st_size / 2**20:.1f} MiB): "
               + " ".join(info.written))


@image.command("disk")
@click.argument("name", required=False)
@_common
@click.option("--boot", "boot_path", type=click.Choice(["grub", "trusted"]), default="trusted", show_default=True,
              help="grub: GRUB for BIOS and UEFI with a dracut initramfs; trusted: systemd-boot + signed UKI on "
                   "the ESP, for Secure Boot.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the raw disk image (default out/IMAGE-BOOT.raw).")
@_guard
def image_disk(name: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
               as_json: bool, boot_path: str, keys_dir: Path | None, output: Path | None) -> None:
    """Write a GPT disk image with the root file system (ext4): for grub, a BIOS boot partition, an ESP
    with GRUB and the root holding GRUB's modules, the kernel and a dracut initramfs; for trusted, an
    ESP with signed systemd-boot and the signed UKI."""
    from hadron.boot import grub as grubboot
    from hadron.boot import secureboot
    from hadron.boot import trusted as bootimage

    ctx = _ctx(recipes, toolchain, cache_dir)
    _check_boot_path(ctx, name, boot_path)
    if boot_path == "grub":
        built = _built_image(ctx, name, quiet=as_json)
        out = output or ctx.settings.project / "out" / f"{built.name}-grub.raw"
        g = grubboot.build_grub_disk(built, out)
        gdoc = {"disk": str(out), "bytes": g.size, "initramfs_bytes": g.initramfs_size,
                "root_fs_uuid": g.root_fs_uuid, "log": str(out.with_suffix(".log"))}
        click.echo(json.dumps(gdoc, indent=2) if as_json else
                   f"disk {out} ({g.size / 2**20:.0f} MiB; initramfs {g.initramfs_size / 2**20:.1f} MiB)")
        return
    ks = secureboot.load_keys(_keys_dir(keys_dir))
    built = _built_image(ctx, name, quiet=as_json)
    out = output or ctx.settings.project / "out" / f"{built.name}-{boot_path}.raw"
    d = bootimage.build_trusted_disk(built, ks, out, epoch=ctx.settings.source_date_epoch)
    doc = {"disk": str(out), "bytes": d.size, "uki_bytes": d.uki.size, "root_partuuid": d.root_partuuid}
    click.echo(json.dumps(doc, indent=2) if as_json else
               f"disk {out} ({d.size / 2**20:.0f} MiB; UKI {d.uki.size / 2**20:.1f} MiB)")
