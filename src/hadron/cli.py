"""The ``hadron`` command line: parses, calls the build service and the stage modules, prints.

Only click and the standard library are imported up front: a no-op ``hadron build`` is answered by
:mod:`hadron.noop` before any recipe, schema or build module is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hadron import __version__
from hadron.errors import HadronError, RecipeError

if TYPE_CHECKING:
    from hadron.boot.qemu import BootResult
    from hadron.context import Context
    from hadron.image.build import BuiltImage

F = TypeVar("F", bound=Callable[..., Any])
KEYS_HELP = "Key directory made by `hadron keys generate` (default $HADRON_KEYS or ./keys)."


def _keys_dir(keys: Path | None) -> Path:
    return keys or Path(os.environ.get("HADRON_KEYS", "keys"))


def _common(f: F) -> F:
    f = click.option("--recipes", "recipes", multiple=True, type=click.Path(path_type=Path, file_okay=False),
                     help="Extra recipe directory; adds or overrides recipes by name (repeatable).")(f)
    f = click.option("--toolchain", default=None, help="Toolchain profile (default from hadron.toml).")(f)
    f = click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
                     help="Cache root (default $HADRON_CACHE, else cache_dir in hadron.toml, else ~/.cache/hadron).")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(f)
    return f


def _build_options(f: F) -> F:
    """The options of every verb that builds: the same names, defaults and meaning everywhere."""
    f = click.option("-j", "--jobs", type=click.IntRange(1, 1024), default=None,
                     help="CPU budget shared by all builds  [default: the number of cores]")(f)
    f = click.option("--offline", is_flag=True, help="Use only sources already in the store.")(f)
    f = click.option("--keep-going/--fail-fast", default=True, show_default=True,
                     help="After a failure, keep building packages that do not depend on it.")(f)
    f = click.option("--no-check", is_flag=True, help="Skip the recipes' check steps.")(f)
    return f


def _ctx(recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None, *, jobs: int | None = None,
         offline: bool = False, keep_going: bool = True, no_check: bool = False) -> Context:
    from hadron.config import load_settings
    from hadron.context import Context

    return Context(load_settings(extra_recipes=list(recipes), toolchain=toolchain, cache_dir=cache_dir, jobs=jobs,
                                 offline=offline, keep_going=keep_going, check=not no_check))


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
@_build_options
@click.option("--executor", default="local", show_default=True, metavar="local|buildkit[=ADDR,…]",
              help="Where package builds run: local bwrap sandboxes, or BuildKit builds on Docker daemons "
                   "(ADDR: unix:///path/docker.sock or tcp://host:port; default the local daemon). Either gives "
                   "the same keys and outputs; BuildKit needs the locked build environment.")
@_guard
def build(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
          as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool, executor: str) -> None:
    """Build TARGETS (packages or images) and what they need (default: the default image of hadron.toml,
    or every package if it names none)."""
    from hadron import noop

    req = noop.Request.make(targets, recipes, toolchain, cache_dir)
    doc = noop.answer(req)
    if doc is None:
        from hadron import service

        doc = service.build_request(req, jobs=jobs, offline=offline, keep_going=keep_going, check=not no_check,
                                    quiet=as_json, executor=executor)
    _print_build(doc, as_json)
    sys.exit(0 if doc["ok"] else 1)


def _print_build(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:  # one line: json's C encoder (an indented dump is pure Python, a no-op's largest cost)
        click.echo(json.dumps(doc))
        return
    pk = doc["packages"]
    counts = ", ".join(f"{n} {s}" for s in ("built", "pulled", "cached", "failed", "skipped")
                       if (n := sum(1 for p in pk.values() if p["status"] == s)))
    click.echo(f"{len(pk)} packages: {counts} ({doc['seconds']:.1f}s)", err=True)
    for name, p in pk.items():
        if p["status"] == "failed":
            click.echo(f"FAILED {name}: {p['error']}\n  log: {p['log']}", err=True)
    for name, i in doc["images"].items():
        click.echo(f"image {name} {i['version']}{' (cached)' if i['cached'] else ''}: {i['path']}\n"
                   f"  rootfs {i['rootfs_bytes'] / 1e6:.1f} MB, OCI layer {i['oci']['layer_size'] / 1e6:.1f} MB "
                   f"compressed, manifest {i['oci']['manifest']}\n"
                   f"  OCI layout: {i['oci_layout']}\n  docker archive: {i['docker_archive']}", err=True)


@main.command()
@click.argument("targets", nargs=-1)
@_common
@click.option("--offline", is_flag=True, help="Only check that the sources are in the store.")
@_guard
def fetch(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
          as_json: bool, offline: bool) -> None:
    """Download and verify the sources of TARGETS and everything they need (default: the default image of
    hadron.toml, or every package if it names none)."""
    from hadron import service
    from hadron.engine.fetch import fetch_recipe

    ctx = _ctx(recipes, toolchain, cache_dir, offline=offline)
    packages, _images = service.expand_targets(ctx, list(targets))
    failures: list[str] = []
    report: dict[str, list[dict[str, str]]] = {}
    for n in ctx.graph.closure(packages):
        try:
            got = fetch_recipe(ctx.store, ctx.recipes[n], ctx.mirrors, offline=offline, upstream=ctx.settings.upstream)
        except HadronError as e:
            failures.append(str(e))
            continue
        report[n] = [{"file": f.source.name, "sha256": f.digest, "from": f.origin, "path": str(f.path),
                      "trust": f.trust} for f in got]
        if not as_json:
            for f in got:
                click.echo(f"{n}: {f.source.name} ok ({f.origin}; {f.trust})", err=True)
    if as_json:
        click.echo(json.dumps({"ok": not failures, "sources": report, "errors": failures}, indent=2))
    for msg in failures:
        click.echo(f"error: {msg}", err=True)
    sys.exit(1 if failures else 0)


@main.command("verify-repro")
@click.argument("targets", nargs=-1)
@_common
@_build_options
@click.option("--keep", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Keep the varied rebuild's cache, both builds' boot artifacts and the reports in this directory.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Key directory that signs the compared UKIs and disks (default $HADRON_KEYS, else throwaway "
                   "test keys made for the run).")
@click.option("--no-boot", is_flag=True, help="Compare packages and images only, not the UKIs and disk images.")
@_guard
def verify_repro(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
                 as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool,
                 keep: Path | None, keys_dir: Path | None, no_boot: bool) -> None:
    """Rebuild TARGETS (default: the default image) in a second cache on a varied machine (host build path,
    host name, user, umask, locale, time zone, CPU count) and compare every package and image with the
    normal build, then every image's signed UKIs and disk images made from each; diffoscope reports each
    package or image difference, and a UKI or disk difference is located by PE section or GPT partition.
    Exits 1 unless everything is identical."""
    from hadron import service
    from hadron.boot import secureboot
    from hadron.trust import repro

    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    names = list(targets) or ctx.default_targets()
    with ctx.layout.work_dir("repro") as work:
        ks = None
        if not no_boot and any(ctx.images[i].spec.boot for i in service.expand_targets(ctx, names)[1]):
            if keys_dir is None and "HADRON_KEYS" not in os.environ:
                ks = secureboot.generate_keys(work / "keys")
                click.echo(f"boot artifacts are signed with throwaway test keys ({ks.directory}); "
                           "--keys names yours", err=True)
            else:
                ks = secureboot.load_keys(_keys_dir(keys_dir))
        rep = repro.verify_repro(ctx, names, work=work, keep=keep, keys=ks, say=lambda m: click.echo(m, err=True))
    if as_json:
        click.echo(json.dumps(rep.doc(), indent=2))
    else:
        for c in rep.compared:
            click.echo(f"{'identical' if c.identical else 'DIFFERS  '} {c.kind:7} {c.name}  {c.rebuilt}")
            if not c.identical:
                click.echo("    " + "\n    ".join(c.diff.splitlines()[:12]) + f"\n    report: {c.report}")
        click.echo(f"{rep.identical}/{len(rep.compared)} identical ({rep.percent:.1f} %) in {rep.seconds:.0f} s"
                   + (f"; kept in {rep.kept}" if rep.kept else ""), err=True)
    sys.exit(0 if rep.identical == len(rep.compared) else 1)


@main.command()
@click.argument("target", required=False)
@_common
@click.option("--dot", is_flag=True, help="Graphviz output.")
@_guard
def graph(target: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
          as_json: bool, dot: bool) -> None:
    """Show the dependency tree of TARGET (default: every package)."""
    from hadron.image.build import image_packages

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
    """Inspect and maintain the cache (sources, outputs, images)."""


@cache.command("verify")
@_common
@_guard
def cache_verify(recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None, as_json: bool) -> None:
    """Re-hash every cached source, output and image against its digest or manifest."""
    ctx = _ctx(recipes, toolchain, cache_dir)
    report = ctx.cache.verify_all(ctx.store)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for p in report["problems"]:
            click.echo(f"CORRUPT {p}", err=True)
        click.echo(f"{report['sources']} sources, {report['outputs']} outputs, {report['images']} images checked, "
                   f"{len(report['problems'])} problem(s)", err=True)
        if report["problems"]:
            click.echo("hint: delete the named output or image directory (or source file); "
                       "the next build recreates it", err=True)
    sys.exit(1 if report["problems"] else 0)


@cache.command("keygen")
@click.argument("name")
@click.option("--dir", "directory", type=click.Path(path_type=Path, file_okay=False), default=Path("keys"),
              show_default=True, help="Where NAME.secret and NAME.public are written.")
@_guard
def cache_keygen(name: str, directory: Path) -> None:
    """Make a signing key for the remote cache: NAME.secret (this builder's; [cache] signing_key) and
    NAME.public (the line consumers add to [cache] trusted_keys)."""
    from hadron.engine import remote

    secret, public = remote.generate_key(name, directory)
    click.echo(f"secret key: {secret} (keep it on the builder)\npublic key: {public.read_text().strip()}")


@cache.command("push")
@click.argument("targets", nargs=-1)
@_common
@_guard
def cache_push(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
               as_json: bool) -> None:
    """Sign and push the cached outputs of TARGETS (default: the default image) and what they need to
    the remote cache ([cache] remote)."""
    from hadron import service

    ctx = _ctx(recipes, toolchain, cache_dir)
    pushed = service.push_outputs(ctx, list(targets))
    if as_json:
        click.echo(json.dumps(pushed))
    else:
        for name, digest in pushed.items():
            click.echo(f"{name}: {digest}")
        click.echo(f"pushed {len(pushed)} outputs to {ctx.settings.cache_remote}", err=True)


@cache.command("gc")
@click.argument("targets", nargs=-1)
@_common
@click.option("--keep-all-current/--only-targets", default=True, show_default=True,
              help="Keep what the current recipes and images produce for every package and image, or only for "
                   "TARGETS (default: the default image) and what they need.")
@_guard
def cache_gc(targets: tuple[str, ...], recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
             as_json: bool, keep_all_current: bool) -> None:
    """Delete outputs and images the current recipes and images no longer produce (all of them, or all but
    TARGETS' with --only-targets), build environments other than the locked one, and leftovers of
    interrupted builds and boots."""
    from hadron import service

    ctx = _ctx(recipes, toolchain, cache_dir)
    if keep_all_current and targets:
        raise HadronError("TARGETS are only used with --only-targets", hint="add --only-targets, or drop the TARGETS")
    from hadron.engine import buildenv

    keep = service.current_keys(ctx, None if keep_all_current else list(targets))
    res = ctx.cache.gc(keep.outputs, keep.images)
    locked = buildenv.read_lock(ctx.settings.project)
    envs, env_bytes = buildenv.prune(ctx.layout, {locked.digest} if locked else set())
    res = dataclasses.replace(res, count=res.count + envs, freed=res.freed + env_bytes)
    if as_json:
        click.echo(json.dumps({"removed": res.count, "bytes_freed": res.freed, "kept_outputs": len(keep.outputs),
                               "kept_images": len(keep.images)}))
    else:
        click.echo(f"removed {res.count} entr{'y' if res.count == 1 else 'ies'}, freed {res.freed / 1e6:.1f} MB; "
                   f"kept {len(keep.outputs)} outputs and {len(keep.images)} images", err=True)


@main.command()
@click.argument("image", required=False)
@_common
@_build_options
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
@click.option("--immutable", is_flag=True,
              help="Boot the immutable disk (image disk --boot immutable) under Secure Boot with a TPM; --check "
                   "boots it twice (read-only verity root, /var kept, boot counting) and checks that a UKI with "
                   "another root hash and a root partition with one byte changed do not come up.")
@_guard
def boot(image: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
         as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool, check: bool,
         timeout: float, append: str, trusted: bool, keys_dir: Path | None, grub_firmware: str | None,
         immutable: bool) -> None:
    """Boot IMAGE (default: the default image) in QEMU with the serial console on this terminal. Every boot
    starts from the image: its disk is made in a work directory of its own and removed afterwards."""
    from hadron import service
    from hadron.boot import qemu

    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    if sum((trusted, bool(grub_firmware), immutable)) > 1:
        raise HadronError("--trusted, --grub and --immutable are different disks", hint="give one of them")
    if trusted or grub_firmware or immutable:
        service.check_boot_path(ctx, image, "trusted" if trusted else "immutable" if immutable else "grub")
    built = service.build_one_image(ctx, image, quiet=as_json)
    if immutable:
        _boot_immutable(ctx, built, keys_dir, check=check, timeout=timeout, append=append, as_json=as_json)
    if grub_firmware:
        _boot_grub(ctx, built, grub_firmware, check=check, timeout=timeout, append=append, as_json=as_json)
    if trusted:
        _boot_trusted(ctx, built, keys_dir, check=check, timeout=timeout, append=append, as_json=as_json)
    if not built.kernel.exists():
        raise HadronError(f"image {built.name} has no kernel (/boot/vmlinuz)",
                          hint=f"set `kernel = ...` in {ctx.images[built.name].path}")
    with ctx.layout.work_dir("boot") as work:
        disk = work / "disk.ext4"
        qemu.make_disk(built.rootfs, disk, check=check)
        if not check:
            sys.exit(qemu.interactive(built.kernel, disk, append))
        res = qemu.boot(built.kernel, disk, timeout=timeout, echo=not as_json, append=append)
    _report_boot(built.name, res, {}, ok=res.ok, as_json=as_json)


def _report_boot(name: str, res: BootResult, extra: dict[str, Any], *, ok: bool, as_json: bool) -> None:
    analyze = res.reported("TIME")
    info: dict[str, Any] = {"image": name, "state": res.state, "failed_units": res.failed, "ok": ok,
                            "seconds_to_multi_user": res.seconds_to_check,
                            "seconds_total": round(res.seconds_total, 1),
                            "systemd_analyze_time": analyze[0] if analyze else None, **extra}
    if not ok:
        info["console_tail"] = res.console[-8000:]
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        t = f"{res.seconds_to_check:.1f}s" if res.seconds_to_check else "never"
        more = "".join(f" {k}={v}" for k, v in extra.items() if not isinstance(v, list | dict))
        click.echo(f"\nboot check: state={res.state} failed={res.failed or 'none'}; "
                   f"multi-user.target reached after {t} (QEMU start to report){more}", err=True)
        if analyze:
            click.echo(f"systemd-analyze: {analyze[0]}", err=True)
    sys.exit(0 if ok else 1)


def _boot_grub(ctx: Context, built: BuiltImage, firmware: str, *, check: bool, timeout: float, append: str,
               as_json: bool) -> None:
    from hadron.boot import grub, qemu

    with ctx.layout.work_dir("grub-boot") as work:
        g = grub.build_grub_disk(built, work / "disk.raw", check=check, cmdline_extra=append,
                                 log=ctx.layout.log(f"{built.name}-grub-disk"), epoch=ctx.settings.source_date_epoch)
        if not check:
            sys.exit(qemu.interactive_disk(g.path, firmware))
        res = qemu.boot_disk(g.path, firmware, timeout=timeout, echo=not as_json)
    _report_boot(built.name, res, {"firmware": firmware, "disk_bytes": g.size, "initramfs_bytes": g.initramfs_size},
                 ok=res.ok, as_json=as_json)


def _boot_trusted(ctx: Context, built: BuiltImage, keys_dir: Path | None, *, check: bool, timeout: float,
                  append: str, as_json: bool) -> None:
    from hadron.boot import qemu, secureboot, trusted, unseal

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    with ctx.layout.work_dir("trusted-boot") as work:
        if not check:
            trusted.build_trusted_disk(built, ks, work / "disk.raw", cmdline_extra=append,
                                       epoch=ctx.settings.source_date_epoch)
            store = work / "OVMF_VARS.fd"
            secureboot.enroll_ovmf_vars(ks, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
            sys.exit(qemu.interactive_disk(work / "disk.raw", "secure-boot", vars_file=store, tpm=True))
        tc = trusted.check_trusted_boot(built, ks, work, timeout=timeout, echo=not as_json, cmdline_extra=append,
                                        epoch=ctx.settings.source_date_epoch)
    m = tc.matrix
    if not as_json:
        for c in m.cases:
            click.echo(f"unseal {c.name}: {c.result} (expected {c.expected}){'' if c.ok else '  <- WRONG'}"
                       + (f": {c.detail}" if c.result != "unsealed" else ""))
            if c.result == "refused" and (meaning := unseal.explain(c.detail)):
                click.echo(f"  means: {meaning}")
    _report_boot(built.name, tc.boot, {"pcr11": tc.boot.pcr11, "pcr11_expected": tc.pcr11_expected,
                                       "pcr11_policy_signed": tc.pcr11_policy_signed, "disk_bytes": tc.disk.size,
                                       "uki_bytes": tc.disk.uki.size, "unseal": [c.to_json() for c in m.cases],
                                       "unseal_ok": m.ok, "unseal_boot_seconds": m.boots},
                 ok=tc.ok, as_json=as_json)


def _boot_immutable(ctx: Context, built: BuiltImage, keys_dir: Path | None, *, check: bool, timeout: float,
                    append: str, as_json: bool) -> None:
    from hadron.boot import immutable, qemu, secureboot

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    log = ctx.layout.log(f"{built.name}-immutable-disk")
    with ctx.layout.work_dir("immutable-boot") as work:
        if not check:
            immutable.build_immutable_disk(built, ks, work / "disk.raw", log=log, cmdline_extra=append,
                                           epoch=ctx.settings.source_date_epoch)
            store = work / "OVMF_VARS.fd"
            secureboot.enroll_ovmf_vars(ks, qemu.OVMF_DIR / "OVMF_VARS_4M.fd", store)
            sys.exit(qemu.interactive_disk(work / "disk.raw", "secure-boot", vars_file=store, tpm=True))
        ic = immutable.check_immutable_boot(built, ks, work, timeout=timeout, echo=not as_json, log=log,
                                            cmdline_extra=append, epoch=ctx.settings.source_date_epoch)
    if not as_json:
        click.echo(f"ESP /EFI/Linux before the first boot: {' '.join(ic.esp_before)}; after it: "
                   f"{' '.join(ic.esp_after)}")
        for k in ("root", "write", "verity-root-hash", "var", "bless", "version"):
            click.echo(f"first boot {k}: {ic.probe.get(k)}")
        click.echo(f"second boot: /var has seen {ic.second_probe.get('var-boots')} boots")
        for a in ic.attempts:
            click.echo(f"{a.name}: {a.result} (expected {a.expected}){'' if a.ok else '  <- WRONG'}: {a.evidence}")
        for p in ic.problems:
            click.echo(f"PROBLEM: {p}")
    _report_boot(built.name, ic.first, {"disk_bytes": ic.disk.size, "uki_bytes": ic.disk.uki.size,
                                        "roothash": ic.disk.roothash, "layout": ic.disk.layout(),
                                        "probe": ic.probe, "second_boot_probe": ic.second_probe,
                                        "second_boot_seconds": ic.second_seconds,
                                        "esp_before": ic.esp_before, "esp_after": ic.esp_after,
                                        "attempts": [a.to_json() for a in ic.attempts], "problems": ic.problems},
                 ok=ic.ok, as_json=as_json)


@main.command()
@click.argument("ref")
@click.option("--image", "image", default=None, help="Image to push (default: the default image).")
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--unsigned", is_flag=True, help="Push without signing the manifest (verify reports it unsigned).")
@click.option("--signatures", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Also write the manifest signature here, in the lookaside layout skopeo and podman read.")
@_common
@_build_options
@_guard
def push(ref: str, image: str | None, tls_verify: bool, keys_dir: Path | None, unsigned: bool,
         signatures: Path | None, recipes: tuple[Path, ...], toolchain: str | None,
         cache_dir: Path | None, as_json: bool, jobs: int | None, offline: bool, keep_going: bool,
         no_check: bool) -> None:
    """Push the image to an OCI registry as REF (e.g. registry.example/hadron/core:0.1), with its SBOM,
    its provenance and a signature of its manifest (by the image signing key of the key directory)."""
    import tempfile

    from hadron import service
    from hadron.trust import keys as trust_keys
    from hadron.trust import registry

    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    built = service.build_one_image(ctx, image, quiet=as_json)
    ks = trust_keys.ImageKeys(_keys_dir(keys_dir))
    if not ks.has_image_key() and not unsigned:
        raise HadronError(f"no image signing key in {ks.directory} (image-signing.fpr and gnupg/)",
                          hint="make one with `hadron keys image-signing`, point --keys or $HADRON_KEYS at it, "
                               "or pass --unsigned to push without a manifest signature")
    with tempfile.TemporaryDirectory(prefix="hadron-push-") as work:
        out = registry.push(built.oci, built.record["version"], ref, Path(work), None if unsigned else ks,
                            tls_verify=tls_verify, signatures=signatures)
    if as_json:
        click.echo(json.dumps({"pushed": ref, **out}))
        return
    click.echo(f"pushed {built.name} to {ref} ({out['manifest']}) with its SBOM and provenance; manifest "
               + (f"signed by {out['signed_by']}" if out["signed_by"] else "not signed"))
    if "lookaside" in out:
        click.echo(f"signature for lookaside clients: {out['lookaside']}")


@main.group("buildenv")
def buildenv_group() -> None:
    """The hermetic build environment package builds run in (buildenv.lock)."""


def _env_status(ctx: Context, env: Any, new: bool | None = None) -> dict[str, Any]:
    from hadron.engine import buildenv

    lock = buildenv.read_lock(ctx.settings.project)
    return {"digest": env.digest, "path": str(env.path), "locked": lock.digest if lock else None,
            "matches_lock": bool(lock and lock.digest == env.digest), **({"new": new} if new is not None else {}),
            "differences": buildenv.differences(lock, env) if lock and lock.digest != env.digest else []}


@buildenv_group.command("build")
@click.option("--update-lock", is_flag=True, help="Write the new environment's digest, packages and wheels to "
              "buildenv.lock (every cache key changes with it).")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_guard
def buildenv_build(update_lock: bool, cache_dir: Path | None, as_json: bool) -> None:
    """Make the build environment with mmdebstrap from the host table's build-environment packages and
    the lock's wheels (newest ones with --update-lock), and compare it with buildenv.lock."""
    from hadron.engine import buildenv

    ctx = _ctx((), None, cache_dir)
    lock = buildenv.read_lock(ctx.settings.project)
    env, new = buildenv.make(ctx.layout, lock.epoch if lock and not update_lock else ctx.settings.source_date_epoch,
                             pins=None if update_lock else lock, log=lambda m: click.echo(f"buildenv: {m}", err=True))
    if update_lock:
        buildenv.write_lock(ctx.settings.project, env)
    doc = _env_status(ctx, env, new)
    if as_json:
        click.echo(json.dumps(doc))
        return
    click.echo(f"build environment {env.digest} ({'new' if new else 'already in the cache'}): {env.path}")
    if doc["matches_lock"]:
        click.echo("it is the one buildenv.lock names" + (" (lock updated)" if update_lock else ""))
    else:
        click.echo(f"buildenv.lock names {doc['locked']}; differences: " + ("; ".join(doc["differences"]) or "none"))
        sys.exit(1)


@buildenv_group.command("push")
@click.argument("remote")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@_guard
def buildenv_push(remote: str, cache_dir: Path | None, tls_verify: bool) -> None:
    """Push the locked build environment to REMOTE (a registry repository, e.g. host:5000/hadron/buildenv)."""
    from hadron.engine import buildenv

    ctx = _ctx((), None, cache_dir)
    env = ctx.build_env
    if env is None:
        raise HadronError("this project has no buildenv.lock", hint="run `hadron buildenv build --update-lock`")
    click.echo(f"pushed {buildenv.push(env, remote, tls_verify=tls_verify)}")


@buildenv_group.command("pull")
@click.argument("remote")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@_guard
def buildenv_pull(remote: str, cache_dir: Path | None, tls_verify: bool) -> None:
    """Pull the build environment buildenv.lock names from REMOTE, by digest."""
    from hadron.engine import buildenv

    ctx = _ctx((), None, cache_dir)
    lock = buildenv.read_lock(ctx.settings.project)
    if lock is None:
        raise HadronError("this project has no buildenv.lock", hint="run `hadron buildenv build --update-lock`")
    env = buildenv.pull(ctx.layout, remote, lock.digest, tls_verify=tls_verify)
    click.echo(f"build environment {env.digest}: {env.path}")


@buildenv_group.command("show")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None, help="Cache root.")
@_guard
def buildenv_show(cache_dir: Path | None) -> None:
    """Print the locked environment's digest, whether it is in the cache, and its packages."""
    from hadron.engine import buildenv

    ctx = _ctx((), None, cache_dir)
    lock = buildenv.read_lock(ctx.settings.project)
    if lock is None:
        raise HadronError("this project has no buildenv.lock", hint="run `hadron buildenv build --update-lock`")
    env = buildenv.find(ctx.layout, lock.digest)
    click.echo(f"digest: {lock.digest}\nin the cache: {env.path if env else 'no'}\nDebian {lock.suite}: "
               f"{len(lock.installed)} packages installed, {len(lock.packages)} requested: {' '.join(lock.packages)}"
               f"\nwheels: {' '.join(sorted(lock.wheels))}")


@main.group()
def keys() -> None:
    """Secure Boot, TPM policy and image signing keys."""


@keys.command("generate")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing key directory.")
@_guard
def keys_generate(directory: Path | None, force: bool) -> None:
    """Create TEST keys: PK, KEK and db (key, certificate, ESL, signed .auth) and the PCR 11 policy key."""
    from hadron.boot import secureboot

    ks = secureboot.generate_keys(_keys_dir(directory), force=force)
    click.echo(f"test keys written to {ks.directory} (PK, KEK, db, TPM PCR policy key); do not ship them")


@keys.command("image-signing")
@click.argument("directory", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--force", is_flag=True, help="Replace the image signing keys there.")
@_guard
def keys_image_signing(directory: Path | None, force: bool) -> None:
    """Add the image signing keys to a key directory: provenance.key/.pub (signs SBOM and provenance)
    and an OpenPGP key (gnupg/, image-signing.gpg) that signs image manifests."""
    from hadron.trust import keys as trust_keys

    ks = trust_keys.generate(_keys_dir(directory), force=force)
    click.echo(f"image signing keys written to {ks.directory}: provenance.pub (for hadron verify --key), "
               f"image-signing.gpg (keyPath of a signedBy policy), OpenPGP key {ks.fingerprint}")


@main.command()
@click.argument("target")
@click.option("--key", "key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Provenance public key (default: provenance.pub of the key directory).")
@click.option("--keyring", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="OpenPGP public key the manifest signature must verify with, for a registry REF "
                   "(default: image-signing.gpg of the key directory).")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--tag", default=None, help="Tag of the image in an OCI layout directory (default: its only image).")
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@_common
@_guard
def verify(target: str, key: Path | None, keyring: Path | None, keys_dir: Path | None, tag: str | None,
           tls_verify: bool, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
           as_json: bool) -> None:
    """Check an image: TARGET is a registry reference (HOST/PATH:TAG), an OCI layout or image directory,
    or an image name (the one `hadron build NAME` last made, out/NAME). The provenance must be signed
    by the key, be about this image's manifest and name the SBOM, which must list exactly the image's
    files; a registry image's manifest signature must satisfy a skopeo policy that requires it."""
    from hadron.image import oci
    from hadron.trust import keys as trust_keys
    from hadron.trust import verify as trust_verify

    kdir = _keys_dir(keys_dir)
    pub = trust_keys.public_key(key or kdir / trust_keys.PROVENANCE_PUB)
    path = Path(target)
    if path.is_dir():
        layout = path / "oci" if (path / "oci" / "index.json").is_file() else path
        report = trust_verify.verify_layout(layout, tag or oci.only_image_tag(layout), pub)
    elif "/" in target:
        ring = keyring or kdir / trust_keys.IMAGE_KEYRING
        if not ring.is_file():
            raise HadronError(f"{ring}: no OpenPGP public key to check the manifest signature with",
                              hint="pass --keyring (the signer's image-signing.gpg) or --keys")
        report = trust_verify.verify_remote(target, pub, ring, tls_verify=tls_verify)
    else:
        from hadron import service

        ctx = _ctx(recipes, toolchain, cache_dir)
        name = service.image_name(ctx, target)
        last = ctx.settings.project / "out" / name
        if not (last / "oci" / "index.json").is_file():
            raise HadronError(f"image {name} has not been built here ({last} is missing)",
                              hint=f"build it first: hadron build {name}")
        report = trust_verify.verify_layout(last / "oci", oci.only_image_tag(last / "oci"), pub)
    if as_json:
        click.echo(json.dumps(report.doc()))
        return
    for c in report.checks:
        click.echo(f"ok: {c}")
    click.echo(f"verified {report.where} ({report.manifest}): SBOM {report.sbom_packages} packages, "
               f"{report.sbom_files} files; provenance {report.dependencies} resolved dependencies; "
               f"{report.seconds:.1f} s")


@main.group()
def image() -> None:
    """Bootable artifacts made from a built image (UKI, disk images)."""


@image.command("uki")
@click.argument("name", required=False)
@_common
@_build_options
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the UKI (default out/IMAGE.efi).")
@_guard
def image_uki(name: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
              as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool,
              keys_dir: Path | None, output: Path | None) -> None:
    """Assemble the image's signed Unified Kernel Image (PCR 11 policy signed, Secure Boot signed)."""
    from hadron import service
    from hadron.boot import secureboot, trusted

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    built = service.build_one_image(ctx, name, quiet=as_json)
    out = output or ctx.settings.project / "out" / f"{built.name}.efi"
    info = trusted.build_signed_uki(built, ks, out, epoch=ctx.settings.source_date_epoch)
    doc = {"uki": str(out), "bytes": out.stat().st_size, "sections": list(info.written), "pcr11": info.pcr11}
    click.echo(json.dumps(doc, indent=2) if as_json else f"UKI {out} ({out.stat().st_size / 2**20:.1f} MiB): "
               + " ".join(info.written))


@image.command("audit")
@click.argument("name", required=False)
@_common
@_build_options
@click.option("--all", "everything", is_flag=True, help="One row per ELF file, not only the failed or allowed.")
@_guard
def image_audit(name: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
                as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool,
                everything: bool) -> None:
    """Print the image's ELF hardening audit (PIE, RELRO, BIND_NOW, NX, canary, RPATH, TEXTREL, FORTIFY)."""
    from hadron import service
    from hadron.image.hardening import table

    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    built = service.build_one_image(ctx, name, quiet=as_json)
    record = built.record.get("hardening")
    if record is None:
        raise HadronError(f"image {built.name}: its record ({built.path}/image.json) has no hardening audit",
                          hint="it was assembled before the audit existed; remove it with `hadron cache gc`")
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"image {built.name} ({built.path}), toolchain {record['toolchain']}"
               + ("" if record["enforced"] else " (not enforced: the build machine's own compiler)"))
    for line in table(record, everything=everything):
        click.echo(line)


@image.command("disk")
@click.argument("name", required=False)
@_common
@_build_options
@click.option("--boot", "boot_path", type=click.Choice(["grub", "trusted", "immutable"]), default="trusted",
              show_default=True,
              help="grub: GRUB for BIOS and UEFI with a dracut initramfs; trusted: systemd-boot + signed UKI on "
                   "the ESP, for Secure Boot; immutable: trusted with a dm-verity erofs root in A/B slots, "
                   "boot counting and /var made at first boot (partitions by the image's systemd-repart).")
@click.option("--version", "version", default=None,
              help="immutable: the version written into the disk (IMAGE_VERSION; default the image's).")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the raw disk image (default out/IMAGE-BOOT.raw).")
@_guard
def image_disk(name: str | None, recipes: tuple[Path, ...], toolchain: str | None, cache_dir: Path | None,
               as_json: bool, jobs: int | None, offline: bool, keep_going: bool, no_check: bool, boot_path: str,
               version: str | None, keys_dir: Path | None, output: Path | None) -> None:
    """Write a GPT disk image with the root file system (ext4): for grub, a BIOS boot partition, an ESP
    with GRUB and the root holding GRUB's modules, the kernel and a dracut initramfs; for trusted, an
    ESP with signed systemd-boot and the signed UKI."""
    from hadron import service
    from hadron.boot import grub, secureboot, trusted

    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    service.check_boot_path(ctx, name, boot_path)
    if boot_path == "grub":
        built = service.build_one_image(ctx, name, quiet=as_json)
        out = output or ctx.settings.project / "out" / f"{built.name}-grub.raw"
        g = grub.build_grub_disk(built, out, epoch=ctx.settings.source_date_epoch)
        gdoc = {"disk": str(out), "bytes": g.size, "initramfs_bytes": g.initramfs_size,
                "root_fs_uuid": g.root_fs_uuid, "log": str(out.with_suffix(".log"))}
        click.echo(json.dumps(gdoc, indent=2) if as_json else
                   f"disk {out} ({g.size / 2**20:.0f} MiB; initramfs {g.initramfs_size / 2**20:.1f} MiB)")
        return
    if version is not None and boot_path != "immutable":
        raise HadronError("--version is for the immutable disk", hint="add --boot immutable")
    ks = secureboot.load_keys(_keys_dir(keys_dir))
    built = service.build_one_image(ctx, name, quiet=as_json)
    out = output or ctx.settings.project / "out" / f"{built.name}-{boot_path}.raw"
    if boot_path == "immutable":
        from hadron.boot import immutable

        log = out.with_suffix(".log")
        log.unlink(missing_ok=True)
        m = immutable.build_immutable_disk(built, ks, out, log=log, version=version,
                                           epoch=ctx.settings.source_date_epoch)
        mdoc = {"disk": str(out), "bytes": m.size, "uki": m.uki_name, "uki_bytes": m.uki.size,
                "version": m.version, "roothash": m.roothash, "cmdline": m.cmdline, "layout": m.layout(),
                "log": str(log)}
        if as_json:
            click.echo(json.dumps(mdoc, indent=2))
        else:
            click.echo(f"disk {out} ({m.size / 2**20:.0f} MiB; UKI /{m.uki_name} {m.uki.size / 2**20:.1f} MiB; "
                       f"root hash {m.roothash})")
            for p in m.layout():
                click.echo(f"  {p['partno']}: {p['type']:<16} {p['label']:<32} {int(str(p['bytes'])) / 2**20:8.2f} MiB")
        return
    d = trusted.build_trusted_disk(built, ks, out, epoch=ctx.settings.source_date_epoch)
    doc = {"disk": str(out), "bytes": d.size, "uki_bytes": d.uki.size, "root_partuuid": d.root_partuuid}
    click.echo(json.dumps(doc, indent=2) if as_json else
               f"disk {out} ({d.size / 2**20:.0f} MiB; UKI {d.uki.size / 2**20:.1f} MiB)")


@main.group()
def sysext() -> None:
    """System extension images for a base image: build, verify, and the VM matrix."""


@sysext.command("build")
@click.argument("name")
@click.option("--dir", "dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="A tree with usr/ and/or opt/ to carry (repeatable).")
@click.option("--package", "packages", multiple=True, help="A package (recipe) whose files to carry (repeatable).")
@click.option("--image", "image", default=None, help="The base image (default: the default image).")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write it (default out/NAME.raw).")
@_common
@_build_options
@_guard
def sysext_build(name: str, dirs: tuple[Path, ...], packages: tuple[str, ...], image: str | None,
                 keys_dir: Path | None, output: Path | None, recipes: tuple[Path, ...], toolchain: str | None,
                 cache_dir: Path | None, as_json: bool, jobs: int | None, offline: bool, keep_going: bool,
                 no_check: bool) -> None:
    """Make system extension NAME for the base image: erofs + dm-verity + the root hash signed with the
    db key, extension-release.NAME matching the base (ID, SYSEXT_LEVEL, ARCHITECTURE), made by the base's
    own systemd-repart."""
    from hadron import service
    from hadron.boot import secureboot
    from hadron.lifecycle import sysext as sx

    if not dirs and not packages:
        raise HadronError("nothing to put in the extension", hint="give --dir DIR and/or --package NAME")
    sx.check_name(name)
    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    base = service.build_one_image(ctx, image, quiet=as_json)
    sources = list(dirs)
    if packages:
        summary = service.build_packages(ctx, list(packages), quiet=as_json)
        if not summary.ok:
            raise HadronError("packages failed to build:\n" + service.failures(summary))
        sources += [r.output.runtime for n, r in summary.results.items() if n in packages and r.output]
    out = output or ctx.settings.project / "out" / f"{name}.raw"
    log = ctx.layout.log(f"sysext-{name}")
    s = sx.build_sysext(base, name, sources, out, log=log, key=ks.db.key, cert=ks.db.crt)
    doc = {"file": str(out), "bytes": s.size, "roothash": s.roothash, "extension_release": s.release,
           "base": base.name, "log": str(log)}
    click.echo(json.dumps(doc, indent=2) if as_json else
               f"extension {out} ({s.size / 2**20:.1f} MiB) for {base.name}: root hash {s.roothash}, "
               + " ".join(f"{k}={v}" for k, v in s.release.items()))


@sysext.command("verify")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--image", "image", default=None, help="The base image (default: the default image).")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Key directory whose db certificate the machines have enrolled (default $HADRON_KEYS or ./keys).")
@_common
@_build_options
@_guard
def sysext_verify(file: Path, image: str | None, keys_dir: Path | None, recipes: tuple[Path, ...],
                  toolchain: str | None, cache_dir: Path | None, as_json: bool, jobs: int | None, offline: bool,
                  keep_going: bool, no_check: bool) -> None:
    """Say whether the base image would merge FILE, and why: the architecture, the signature (by the db
    certificate or one in the base's verity.d), the hash tree, the extension-release file. Exit 1 if not."""
    from hadron import service
    from hadron.boot import secureboot
    from hadron.lifecycle import sysext as sx

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    base = service.build_one_image(ctx, image, quiet=as_json)
    v = sx.verify_sysext(file, base, sx.trusted_certificates(base, ks.db.crt), log=ctx.layout.log("sysext-verify"))
    if as_json:
        click.echo(json.dumps({**v.to_json(), "base": base.name}, indent=2))
    else:
        click.echo(f"{file}: {'accepted' if v.accepted else 'REFUSED'} by {base.name}"
                   + "".join(f"\n  - {r}" for r in v.reasons))
    sys.exit(0 if v.accepted else 1)


@sysext.command("check")
@click.option("--image", "image", default="core-immutable", show_default=True, help="The base image.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--timeout", type=float, default=600, show_default=True, help="Seconds to wait for the VM.")
@_common
@_build_options
@_guard
def sysext_check(image: str, keys_dir: Path | None, timeout: float, recipes: tuple[Path, ...],
                 toolchain: str | None, cache_dir: Path | None, as_json: bool, jobs: int | None, offline: bool,
                 keep_going: bool, no_check: bool) -> None:
    """The extension matrix: one payload in eleven variants, judged by `sysext verify` and merged one by
    one by systemd-sysext in a VM booted from the base's immutable disk under Secure Boot."""
    from hadron import service
    from hadron.boot import secureboot
    from hadron.lifecycle import sysext_check

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    service.check_boot_path(ctx, image, "immutable")
    base = service.build_one_image(ctx, image, quiet=as_json)
    with ctx.layout.work_dir("sysext-check") as work:
        m = sysext_check.check_sysext_matrix(base, ks, work, timeout=timeout, echo=not as_json,
                                             log=ctx.layout.log(f"{base.name}-sysext-check"),
                                             epoch=ctx.settings.source_date_epoch)
    if not as_json:
        for v in m.variants:
            click.echo(f"{v.variant:<28} VM: {v.vm:<8} (expected {v.expected}); verify: "
                       f"{'accepts' if v.host_accepts else 'refuses'}{'' if v.ok else '  <- WRONG'}"
                       + (f"\n    {v.detail}" if v.detail else "")
                       + "".join(f"\n    verify: {r}" for r in v.host_reasons[:1]))
    _report_boot(base.name, m.boot, {"sysext": [v.to_json() for v in m.variants]}, ok=m.ok, as_json=as_json)


@main.group()
def update() -> None:
    """Whole-image A/B updates: sets for systemd-sysupdate, through a directory or an OCI registry."""


@update.command("publish")
@click.argument("image")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--version", "version", required=True, help="The version to publish (IMAGE_VERSION).")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@_common
@_build_options
@_guard
def update_publish(image: str, directory: Path, version: str, keys_dir: Path | None, recipes: tuple[Path, ...],
                   toolchain: str | None, cache_dir: Path | None, as_json: bool, jobs: int | None, offline: bool,
                   keep_going: bool, no_check: bool) -> None:
    """Add version VERSION of IMAGE (an image with the immutable layout) to the update DIRECTORY: the
    signed UKI, the root, verity and signature partitions as sysupdate's transfers name them, and a
    signed SHA256SUMS."""
    from hadron import service
    from hadron.boot import secureboot
    from hadron.lifecycle import update as up

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    service.check_boot_path(ctx, image, "immutable")
    built = service.build_one_image(ctx, image, quiet=as_json)
    p = up.publish(built, ks, version, directory, log=ctx.layout.log(f"{built.name}-update-{version}"),
                   epoch=ctx.settings.source_date_epoch)
    doc = {"directory": str(directory), "image_id": p.image_id, "version": p.version, "files": list(p.files),
           "roothash": p.roothash}
    click.echo(json.dumps(doc, indent=2) if as_json else
               f"published {p.image_id} {p.version} in {directory}: " + " ".join(p.files))


@update.command("verify")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.option("--current", default=None, help="The running version: refuse a set that is not newer.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_guard
def update_verify(directory: Path, current: str | None, keys_dir: Path | None, as_json: bool) -> None:
    """Check an update directory: SHA256SUMS signed with the db key, every file's checksum, complete
    versions, newer than --current."""
    from hadron.boot import secureboot
    from hadron.lifecycle import update as up

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    versions = up.verify(directory, ks.db.crt, current=current)
    click.echo(json.dumps({"ok": True, "versions": versions}, indent=2) if as_json else
               f"{directory}: signed, checksums match; versions {', '.join(sorted(versions, key=up.version_key))}")


@update.command("push")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True))
@click.argument("ref")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@_guard
def update_push(directory: Path, ref: str, keys_dir: Path | None, tls_verify: bool) -> None:
    """Verify the update DIRECTORY and push it to REF as an OCI artifact."""
    from hadron.boot import secureboot
    from hadron.lifecycle import update as up

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    versions = up.push(directory, ks.db.crt, ref, tls_verify=tls_verify)
    click.echo(f"pushed {directory} (versions {', '.join(sorted(versions))}) to {ref}")


@update.command("pull")
@click.argument("ref")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--current", default=None, help="The running version: refuse a set that is not newer.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--tls-verify/--no-tls-verify", default=True, show_default=True)
@_guard
def update_pull(ref: str, directory: Path, current: str | None, keys_dir: Path | None, tls_verify: bool) -> None:
    """Pull the update set REF into DIRECTORY (new), verified before anything is written there; the
    directory is then a source for `systemd-sysupdate --transfer-source=`."""
    from hadron.boot import secureboot
    from hadron.lifecycle import update as up

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    versions = up.pull(ref, directory, ks.db.crt, current=current, tls_verify=tls_verify)
    click.echo(f"pulled {ref} into {directory}: versions {', '.join(sorted(versions))}")


@update.command("check")
@click.option("--image", "image", default="core-immutable", show_default=True,
              help="An image with the immutable layout.")
@click.option("--keys", "keys_dir", type=click.Path(path_type=Path, file_okay=False), default=None, help=KEYS_HELP)
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds to wait for each VM run.")
@_common
@_build_options
@_guard
def update_check(image: str, keys_dir: Path | None, timeout: float, recipes: tuple[Path, ...], toolchain: str | None,
                 cache_dir: Path | None, as_json: bool, jobs: int | None, offline: bool, keep_going: bool,
                 no_check: bool) -> None:
    """The A/B run in a VM: version 1 installs 2 from a second disk, 2 boots and is marked good and
    installs 3, 3 fails its health check until its tries run out and the machine is back on 2."""
    from hadron import service
    from hadron.boot import secureboot
    from hadron.lifecycle import update_check

    ks = secureboot.load_keys(_keys_dir(keys_dir))
    ctx = _ctx(recipes, toolchain, cache_dir, jobs=jobs, offline=offline, keep_going=keep_going, no_check=no_check)
    service.check_boot_path(ctx, image, "immutable")
    built = service.build_one_image(ctx, image, quiet=as_json)
    with ctx.layout.work_dir("update-check") as work:
        uc = update_check.check_update_rollback(built, ks, work, timeout=timeout, echo=not as_json,
                                                log=ctx.layout.log(f"{built.name}-update-check"),
                                                epoch=ctx.settings.source_date_epoch)
    runs = [r.to_json() for r in uc.runs]
    doc = {"ok": uc.ok, "fell_back": uc.fell_back, "runs": runs, "problems": uc.problems}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        for r in runs:
            click.echo(" ".join(f"{k}={v}" for k, v in r.items()))
        click.echo(f"fell back: {uc.fell_back}")
        for p in uc.problems:
            click.echo(f"PROBLEM: {p}")
    sys.exit(0 if uc.ok else 1)


@main.group()
def host() -> None:
    """The build host: what Hadron needs installed on it."""


@host.command("check")
@click.argument("images", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Every image with every toolchain profile.")
@_common
@_guard
def host_check(images: tuple[str, ...], all_: bool, recipes: tuple[Path, ...], toolchain: str | None,
               cache_dir: Path | None, as_json: bool) -> None:
    """Check that this host has every program and file needed to build IMAGES (default: the default image)
    with the toolchain profile, assemble them and write and boot their disks on each boot path they carry."""
    from hadron import service

    ctx = _ctx(recipes, toolchain, cache_dir)
    profiles = service.toolchain_profiles(ctx) if all_ else [ctx.toolchain.name]
    names = sorted(ctx.images) if all_ else [service.image_name(ctx, n) for n in (images or [None])]
    report = {}
    for profile in profiles:
        pctx = ctx if profile == ctx.toolchain.name else _ctx(recipes, profile, cache_dir)
        report.update(service.host_requirements(pctx, names))
    missing = {stage: {t: who for t, (ok, who) in tools.items() if not ok} for stage, tools in report.items()}
    if as_json:
        click.echo(json.dumps({"ok": not any(missing.values()), "stages": {
            s: {t: {"present": ok, "needed_by": who} for t, (ok, who) in tools.items()} for s, tools in report.items()
        }}, indent=2))
    else:
        for stage, tools in report.items():
            gone = missing[stage]
            click.echo(f"{stage}: {len(tools) - len(gone)}/{len(tools)} present"
                       + "".join(f"\n  MISSING {t} (needed by {', '.join(who[:3])}{' …' if len(who) > 3 else ''})"
                                 for t, who in sorted(gone.items())))
    every = sorted({t for g in missing.values() for t in g})
    if every:
        from hadron.host import install_hint

        raise HadronError(f"this host lacks {len(every)} program(s) or file(s): {', '.join(every)}",
                          hint=install_hint(every))
