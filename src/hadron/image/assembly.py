"""Image assembly: packages' runtime outputs → a root filesystem → OCI image and docker archive.

An image is data: ``distro/images/<name>.toml`` (or ``<name>/image.toml`` with a ``files/`` tree
copied over the root filesystem). Assembly is a flat list of small steps, each logged with its time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import NoteSection
from securesystemslib.signer import Signer

from hadron import BUILD_LOGIC_VERSION, __version__, runner
from hadron.engine.cache import IMAGE_RECORD, Output
from hadron.engine.toolchain import NATIVE, Toolchain
from hadron.errors import HadronError
from hadron.image import hardening, oci
from hadron.image.definition import LoadedImage
from hadron.trust import provenance, sbom

# Host programs assembly runs (rows of hadron.host's table).
HOST_TOOLS = ("strip", "bwrap")
USR_MERGED = ("bin", "sbin", "lib", "lib64")


@dataclass
class ImageBuild:
    """The mutable state of one image assembly."""

    image: LoadedImage
    outputs: dict[str, Output]  # every package in the image, by name
    versions: dict[str, dict[str, Any]]  # name → {version, license, sources}
    work: Path
    epoch: int
    arch: str
    toolchain: Toolchain = NATIVE
    kernel_release: str | None = None
    log: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    # For the SBOM and the provenance: the image's packages and the build-only inputs they were built
    # with, the build environment, who signs (None: the provenance stays unsigned), the image key.
    components: list[sbom.Component] = field(default_factory=list)
    build_inputs: list[sbom.Component] = field(default_factory=list)
    build_env: str | None = None
    signer: Signer | None = None
    key: str = ""
    started: float = field(default_factory=time.time)
    owners: dict[str, str] = field(default_factory=dict)  # rootfs path → the package that installed it

    @property
    def rootfs(self) -> Path:
        return self.work / "rootfs"

    def note(self, text: str) -> None:
        self.log.append(text)


Step = Callable[[ImageBuild], None]


def copy_outputs(b: ImageBuild) -> None:
    """Runtime outputs only, in dependency order; a path may come from one package only, unless the
    image says one package replaces another's files (``replaces``)."""
    owner = b.owners
    replaces = b.image.spec.replaces
    b.rootfs.mkdir(parents=True)
    for name, out in b.outputs.items():
        # Hard links within a package stay hard links (e2fsprogs' e2fsck and fsck.ext4 are one file).
        linked: dict[tuple[int, int], Path] = {}
        for dirpath, dirnames, filenames in os.walk(out.runtime):
            base = Path(dirpath)
            rel_base = base.relative_to(out.runtime)
            for d in list(dirnames):
                src = base / d
                if src.is_symlink():
                    filenames.append(d)
                    dirnames.remove(d)
                    continue
                dst = b.rootfs / rel_base / d
                if not dst.exists():
                    dst.mkdir()
                    dst.chmod(stat.S_IMODE(src.stat().st_mode))
            for f in filenames:
                src = base / f
                rel = (rel_base / f).as_posix()
                dst = b.rootfs / rel
                if dst.exists() or dst.is_symlink():
                    prev = owner.get(rel, "?")
                    if prev in replaces.get(name, []):
                        dst.unlink()
                    elif name in replaces.get(prev, []):
                        continue
                    else:
                        raise HadronError(
                            f"image {b.image.name}: /{rel} is installed by both {prev} and {name}",
                            hint="a path may belong to one package only; drop it from one package's outputs, "
                            "or say in the image that one replaces the other (replaces = { pkg = [\"other\"] })",
                        )
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode):
                    dst.symlink_to(os.readlink(src))
                elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in linked:
                    os.link(linked[(st.st_dev, st.st_ino)], dst)
                else:
                    shutil.copy2(src, dst)
                    if st.st_nlink > 1:
                        linked[(st.st_dev, st.st_ino)] = dst
                owner[rel] = name


def merge_usr(b: ImageBuild) -> None:
    """usrmerge: /bin, /sbin, /lib (and /lib64 if used) become links into /usr; content moves there."""
    r = b.rootfs
    for d in USR_MERGED:
        top, target = r / d, r / "usr" / d
        if top.is_dir() and not top.is_symlink():
            b.owners = {f"usr/{k}" if k.startswith(f"{d}/") else k: v for k, v in b.owners.items()}
            target.mkdir(parents=True, exist_ok=True)
            for entry in sorted(top.iterdir()):
                dst = target / entry.name
                if dst.exists() or dst.is_symlink():
                    raise HadronError(f"usrmerge: /{d}/{entry.name} and /usr/{d}/{entry.name} both exist",
                                      hint="install the file under /usr only (e.g. configure --prefix=/usr)")
                os.replace(entry, dst)
            top.rmdir()
        if d != "lib64" or target.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            if not top.is_symlink():
                top.symlink_to(f"usr/{d}")


PROGRAM_DIRS = ("usr/bin", "usr/sbin")


def drop_replaced_programs(b: ImageBuild) -> None:
    """``replaces`` covers a program's name, not only its path: once /bin and /sbin are merged into
    /usr, a replaced package's program in the other program directory goes too (busybox's
    /usr/sbin/mke2fs applet would otherwise come before e2fsprogs' /usr/bin/mke2fs on PATH)."""
    for winner, losers in sorted(b.image.spec.replaces.items()):
        names = {Path(rel).name for rel, owner in b.owners.items()
                 if owner == winner and Path(rel).parent.as_posix() in PROGRAM_DIRS}
        for rel, owner in sorted(b.owners.items()):
            p = Path(rel)
            if owner in losers and p.parent.as_posix() in PROGRAM_DIRS and p.name in names:
                (b.rootfs / rel).unlink()
                del b.owners[rel]


def _is_strippable_elf(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                return False
            f.seek(0)
            return ELFFile(f).header["e_type"] in ("ET_EXEC", "ET_DYN")
    except (ELFError, OSError):
        return False


def strip_binaries(b: ImageBuild) -> None:
    if not b.image.spec.strip:
        return
    files = []
    # One name per file: strip writes a new file, so the other hard links are made again after it.
    other_names: dict[Path, list[Path]] = {}
    first_name: dict[tuple[int, int], Path] = {}
    for dirpath, _dirs, filenames in os.walk(b.rootfs):
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not p.is_symlink() and p.suffix != ".ko" and _is_strippable_elf(p):
                st = p.stat()
                ident = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and ident in first_name:
                    other_names[first_name[ident]].append(p)
                    continue
                first_name[ident] = p
                other_names[p] = []
                files.append(p)
    before = sum(p.stat().st_size for p in files)
    for i in range(0, len(files), 200):
        chunk = files[i : i + 200]
        modes = {p: p.stat().st_mode for p in chunk}
        for p in chunk:
            p.chmod(modes[p] | stat.S_IWUSR)
        try:
            runner.run(["strip", "--strip-unneeded", "--preserve-dates", *chunk], what="stripping ELF files")
        finally:
            for p in chunk:
                p.chmod(stat.S_IMODE(modes[p]))
    for p, others in other_names.items():
        for o in others:
            o.unlink()
            os.link(p, o)
    after = sum(p.stat().st_size for p in files)
    b.note(f"stripped {len(files)} ELF files: {before / 1e6:.1f} MB → {after / 1e6:.1f} MB")


def install_files(b: ImageBuild) -> None:
    for files in b.image.files:
        for dirpath, _dirs, names in os.walk(files):
            for n in names:  # the image's own files, no longer the package's
                b.owners.pop((Path(dirpath) / n).relative_to(files).as_posix(), None)
        shutil.copytree(files, b.rootfs, symlinks=True, dirs_exist_ok=True)


def write_os_release(b: ImageBuild) -> None:
    s = b.image.spec
    fields = {
        "NAME": "Hadron",
        "ID": "hadron",
        "PRETTY_NAME": f"Hadron {s.version}",
        "VERSION": s.version,
        "VERSION_ID": s.version,
        "IMAGE_ID": s.name,
        "IMAGE_VERSION": s.version,
        "SYSEXT_LEVEL": s.sysext_level,
        "HOME_URL": "https://github.com/hadron-linux/hadron",
        **s.os_release,
    }
    lib = b.rootfs / "usr" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{k}={_quote(v)}\n" for k, v in fields.items())
    (lib / "os-release").write_text(text)
    etc = b.rootfs / "etc"
    etc.mkdir(exist_ok=True)
    link = etc / "os-release"
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to("../usr/lib/os-release")


def _quote(v: str) -> str:
    return v if v.replace("_", "").replace(".", "").replace("-", "").isalnum() else json.dumps(v)


def install_kernel(b: ImageBuild) -> None:
    boot = b.rootfs / "boot"
    kernels = sorted(boot.glob("vmlinuz-*")) if boot.is_dir() else []
    if b.image.spec.kernel is None:
        return
    if not kernels:
        raise HadronError(f"image {b.image.name}: kernel package {b.image.spec.kernel} installed no /boot/vmlinuz-*")
    release = kernels[-1].name.removeprefix("vmlinuz-")
    link = boot / "vmlinuz"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(kernels[-1].name)
    if not (b.rootfs / "usr" / "lib" / "modules" / release).is_dir():
        b.note(f"kernel {release} has no modules directory")
    b.kernel_release = release


def write_component_manifest(b: ImageBuild) -> None:
    d = b.rootfs / "usr" / "share" / "hadron"
    d.mkdir(parents=True, exist_ok=True)
    comps = [{"name": n, **b.versions[n], "output": b.outputs[n].digest()} for n in sorted(b.outputs)]
    doc = {"image": b.image.name, "version": b.image.spec.version, "hadron": __version__, "components": comps}
    (d / "components.json").write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def configure_system(b: ImageBuild) -> None:
    """Users and groups (systemd-sysusers) and unit presets, run with the image's own tools in a
    sandbox whose root is the image. machine-id is left for first boot."""
    r = b.rootfs
    etc = r / "etc"
    etc.mkdir(exist_ok=True)
    cmds = []
    if (r / "usr/bin/systemd-sysusers").exists():
        cmds.append("systemd-sysusers")
    if (r / "usr/bin/systemctl").exists():
        cmds.append("systemctl preset-all")
    if (r / "usr/bin/journalctl").exists():
        cmds.append("journalctl --update-catalog")
    mid = etc / "machine-id"
    with contextlib.suppress(FileNotFoundError):
        mid.unlink()
    if not cmds:
        return
    script = "set -e\n" + "\n".join(cmds)
    argv = [
        "bwrap", "--unshare-all", "--die-with-parent", "--bind", str(r), "/",
        "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/run", "--clearenv",
        "--setenv", "PATH", "/usr/bin", "--setenv", "SYSTEMD_OFFLINE", "1", "--", "/bin/sh", "-c", script,
    ]
    res = runner.run(argv, what=f"configuring the image ({' && '.join(cmds)})")
    b.note(res.stderr.strip()[-2000:])
    # First boot: an empty machine-id tells systemd to generate one (and run presets again).
    mid.write_text("")
    mid.chmod(0o444)


# Part of every image key: bumped when the steps change what an image contains, so that images
# are assembled again without rebuilding any package.
ASSEMBLY_VERSION = "6"

UPDATED_STAMP = """\
# The modification time of /usr for which /etc and /var were last updated (the format of
# systemd-update-done, which the image build stands in for: users, groups and the journal catalog
# were made then). ConditionNeedsUpdate= is false until /usr changes.
TIMESTAMP_NSEC={nsec}
"""


def mark_updated(b: ImageBuild) -> None:
    """Stamp /etc and /var as up to date with this /usr, so the first boot does not redo the work
    ``configure_system`` did (systemd-sysusers, journal catalog, systemd-update-done), and an image
    derived with a changed /usr still gets it redone at its boot."""
    r = b.rootfs
    if not (r / "usr/bin/systemctl").exists():
        return
    usr = (r / "usr").stat()
    for d in ("etc", "var"):
        stamp = r / d / ".updated"
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(UPDATED_STAMP.format(nsec=usr.st_mtime_ns))
        os.utime(stamp, ns=(usr.st_mtime_ns, usr.st_mtime_ns))


# The ELF note programs use to name the libraries they may dlopen() (the "ELF dlopen metadata"
# format systemd and others follow): owner FDO, type 0x407c0c0a, a JSON array of
# {feature, description, priority, soname: [alternatives]}.
DLOPEN_NOTE = (".note.dlopen", "FDO", 0x407C0C0A)
LIBRARY_DIRS = ("usr/lib", "usr/lib64", "lib", "lib64")


def dlopen_metadata(path: Path) -> list[dict[str, Any]]:
    """The dlopen metadata entries of one ELF file (none when it has no .note.dlopen)."""
    section, owner, ntype = DLOPEN_NOTE
    with path.open("rb") as f:
        sec = ELFFile(f).get_section_by_name(section)
        if not isinstance(sec, NoteSection):
            return []
        out: list[dict[str, Any]] = []
        for note in sec.iter_notes():
            kind: object = note["n_type"]  # an int for types pyelftools has no name for
            if note["n_name"] != owner or kind != ntype:
                continue
            desc = note["n_desc"]
            raw = desc if isinstance(desc, bytes) else str(desc).encode()
            try:
                out += json.loads(raw.rstrip(b"\0"))
            except ValueError as e:
                raise HadronError(f"{path}: {section} holds invalid JSON ({e})") from None
        return out


def check_dlopen(b: ImageBuild) -> None:
    """Every library a program names in its dlopen metadata is in the image, or the image says why not
    (``dlopen_absent``): a feature built in must not fail at run time for a missing library."""
    absent_ok = b.image.spec.dlopen_absent
    wanted: dict[str, set[str]] = {}  # "soname-a | soname-b" → files that name it
    features = 0
    for dirpath, _dirs, filenames in os.walk(b.rootfs):
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_symlink() or p.suffix == ".ko" or not _is_strippable_elf(p):
                continue
            for entry in dlopen_metadata(p):
                features += 1
                wanted.setdefault(" | ".join(entry.get("soname", [])), set()).add(f"/{p.relative_to(b.rootfs)} "
                                                                 f"({entry.get('feature')}, {entry.get('priority')})")
    missing = []
    for alternatives, users in sorted(wanted.items()):
        names = alternatives.split(" | ")
        if any((b.rootfs / d / n).exists() for d in LIBRARY_DIRS for n in names):
            continue
        if any(n in absent_ok for n in names):
            continue
        missing.append(f"{alternatives}: named by {', '.join(sorted(users)[:3])}"
                       + (f" and {len(users) - 3} more" if len(users) > 3 else ""))
    if missing:
        raise HadronError(
            f"image {b.image.name}: libraries its programs may load (ELF dlopen metadata) are missing:\n  "
            + "\n  ".join(missing),
            hint="add the package that provides the library to the image or to the program's recipe's run "
                 f"dependencies, or say why the image leaves it out in dlopen_absent ({b.image.path})")
    b.note(f"dlopen metadata: {features} entries naming {len(wanted)} libraries, every one in the image"
           + (f" or listed in dlopen_absent ({', '.join(sorted(absent_ok))})" if absent_ok else ""))


def check_hardening(b: ImageBuild) -> None:
    """The ELF hardening audit (hadron.image.hardening) of what the image ships: its table goes into
    the image record; a violation the image's ``hardening_allowed`` does not excuse fails the image
    (for a profile that is audited), and so does an allow-list entry that excuses nothing."""
    tc = b.toolchain
    allow = [hardening.AllowEntry(a.path, tuple(a.checks), a.reason) for a in b.image.spec.hardening_allowed]
    fortify = hardening.fortify_from_flags(tc.name, tc.cflags)
    audit = hardening.audit_tree(b.rootfs, b.arch, fortify, allow)
    b.summary["hardening"] = {"toolchain": tc.name, "enforced": tc.audited, **audit.record(allow)}
    violations = audit.violations
    b.note(f"hardening audit ({tc.name} profile): {len(audit.files)} ELF files, {len(violations)} violations, "
           f"{sum(len(f.allowed_by) for f in audit.files)} allowed by hardening_allowed")
    if audit.unused:
        raise HadronError(
            f"image {b.image.name}: hardening_allowed entries that excuse no file:\n  " + "\n  ".join(audit.unused),
            hint=f"remove them (or the checks named) from hardening_allowed in {b.image.path}")
    if not violations or not tc.audited:
        return
    by_check: dict[str, list[str]] = {}
    for f, check in violations:
        by_check.setdefault(check, []).append(f"/{f.path}: {f.details.get(check, '')}")
    lines = []
    for check, items in by_check.items():
        lines.append(f"{check} ({len(items)} files):")
        lines += [f"  {i}" for i in items[:15]] + ([f"  ... and {len(items) - 15} more"] if len(items) > 15 else [])
    raise HadronError(
        f"image {b.image.name}: ELF files fail the hardening audit:\n  " + "\n  ".join(lines),
        hint=f"fix the package's recipe or the compile/link flags of toolchain profile {tc.name!r} ([flags]), "
             f"or name the files in hardening_allowed of {b.image.path} with the checks and the reason")


def check_setuid(b: ImageBuild) -> None:
    allowed = set(b.image.spec.setuid_allowed)
    bad = []
    for dirpath, _dirs, files in os.walk(b.rootfs):
        for f in files:
            p = Path(dirpath) / f
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                rel = p.relative_to(b.rootfs).as_posix()
                if rel not in allowed:
                    bad.append(f"/{rel} ({oct(stat.S_IMODE(st.st_mode))})")
    if bad:
        raise HadronError(
            f"image {b.image.name}: setuid/setgid files not in the allow-list:\n  " + "\n  ".join(bad),
            hint=f"remove the bit in the package's recipe, or list the path in setuid_allowed ({b.image.path})",
        )


def write_oci(b: ImageBuild) -> None:
    labels = {
        "org.opencontainers.image.title": f"hadron-{b.image.name}",
        "org.opencontainers.image.version": b.image.spec.version,
        "org.opencontainers.image.description": b.image.spec.summary,
    }
    info = oci.write_layout(b.rootfs, b.work / "oci", tag=b.image.spec.version, epoch=b.epoch, arch=b.arch,
                            labels=labels, cmd=b.image.spec.cmd)
    oci.write_docker_archive(b.work / "oci", b.image.spec.version, b.work / "docker-archive.tar",
                             f"hadron/{b.image.name}:{b.image.spec.version}")
    b.summary["oci"] = info


SBOM_FILE = "sbom.spdx.json"
PROVENANCE_FILE = "provenance.dsse.json"


def attest(b: ImageBuild) -> None:
    """The SPDX SBOM and the SLSA provenance of the finished image, as artifacts referring to its
    manifest in the OCI layout (and as files beside it); the provenance is signed when a key is set."""
    info = b.summary["oci"]
    layout = b.work / "oci"
    subject, _ = oci.image_manifest(layout, b.image.spec.version)
    files = sbom.hash_files(b.rootfs)
    doc = sbom.document(image=b.image.name, version=b.image.spec.version, manifest_digest=info["manifest"],
                        epoch=b.epoch, files=files, owners=b.owners, components=b.components,
                        build_inputs=b.build_inputs)
    sbom_bytes = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    stmt = provenance.statement(
        image=b.image.name, version=b.image.spec.version, manifest_digest=info["manifest"],
        external={"image": b.image.name, "version": b.image.spec.version, "definition": b.image.digest(),
                  "arch": b.arch},
        internal={"source_date_epoch": b.epoch, "assembly": ASSEMBLY_VERSION, "build_logic": BUILD_LOGIC_VERSION},
        components=b.components, build_inputs=b.build_inputs, build_env=b.build_env, invocation=b.key,
        started=b.started, finished=time.time(), sbom=sbom_bytes)
    envelope = provenance.sign(stmt, b.signer) if b.signer else provenance.unsigned(stmt)
    oci.add_referrers(layout, subject, [
        oci.Referrer(sbom.SPDX_MEDIA, sbom.SPDX_MEDIA, sbom_bytes, {oci.TITLE: SBOM_FILE}),
        oci.Referrer(provenance.DSSE_MEDIA, provenance.DSSE_MEDIA, envelope,
                     {oci.TITLE: PROVENANCE_FILE, "in-toto.io/predicate-type": provenance.PREDICATE_TYPE}),
    ])
    (b.work / SBOM_FILE).write_bytes(sbom_bytes)
    (b.work / PROVENANCE_FILE).write_bytes(envelope)
    signed_by = b.signer.public_key.keyid if b.signer else None
    b.summary["trust"] = {"sbom_packages": len(doc["packages"]), "sbom_files": len(doc["files"]),
                          "provenance_dependencies": len(stmt["predicate"]["buildDefinition"]["resolvedDependencies"]),
                          "provenance_signed_by": signed_by}
    b.note(f"SBOM: {len(doc['packages'])} packages, {len(doc['files'])} files; provenance "
           + (f"signed by key {signed_by[:16]}" if signed_by else "unsigned (no provenance key)"))


STEPS: list[Step] = [
    copy_outputs,
    merge_usr,
    drop_replaced_programs,
    install_kernel,
    strip_binaries,
    check_dlopen,
    install_files,
    check_hardening,
    write_os_release,
    write_component_manifest,
    configure_system,
    mark_updated,
    check_setuid,
    write_oci,
    attest,
]


def image_key(image: LoadedImage, outputs: dict[str, Output], toolchain: str, arch: str, epoch: int,
              signer: str | None = None) -> str:
    """``signer``: the key id that signs the provenance (None: unsigned), so that an image built
    without a key is assembled and signed again once one is set."""
    doc = {
        "logic": BUILD_LOGIC_VERSION,
        "assembly": ASSEMBLY_VERSION,
        "image": image.digest(),
        "outputs": {n: o.digest() for n, o in sorted(outputs.items())},
        "toolchain": toolchain,
        "arch": arch,
        "epoch": epoch,
        "signer": signer,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def rootfs_bytes(root: Path) -> int:
    """The bytes of the files in ``root``, each hard-linked file counted once."""
    sizes: dict[tuple[int, int], int] = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            st = (Path(d) / f).lstat()
            sizes[(st.st_dev, st.st_ino)] = st.st_size
    return sum(sizes.values())


def assemble(b: ImageBuild, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every step in ``b.work`` and write the image record (image.json) there, last; returns it.

    Assembly only ever writes in its own private ``b.work``: publishing the finished directory is
    :meth:`hadron.engine.cache.Cache.publish_image`'s, which never touches a published image."""
    timings: dict[str, float] = {}
    for step in STEPS:
        progress(step.__name__)
        t0 = time.monotonic()
        step(b)
        timings[step.__name__] = round(time.monotonic() - t0, 3)
    size = rootfs_bytes(b.rootfs)
    record = {
        "image": b.image.name,
        "version": b.image.spec.version,
        "kernel_release": b.kernel_release,
        "rootfs_bytes": size,
        "timings": timings,
        "notes": b.log,
        **b.summary,
    }
    (b.work / IMAGE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record
