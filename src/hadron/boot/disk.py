"""Whole-disk images: a GPT partition table written by sfdisk, an EFI system partition made with
mkfs.fat and filled with mtools, and the root file system made by mkfs.ext4 from the rootfs tree.

Everything works on plain files (no loop devices, no mounts, no root). Partition, disk and file
system UUIDs are derived from a seed (the image key) and every time is the build's epoch, so the
same inputs give the same bytes: the ESP through mkfs.fat's invariant mode and mtools keeping entry
times, the root file system through the image's own mke2fs (e2fsprogs 1.47.4 honours
SOURCE_DATE_EPOCH; Debian 12's 1.47.0 stamps the time of the run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hadron import runner
from hadron.engine import sandbox
from hadron.errors import HadronError

# GPT partition type GUIDs (UEFI spec; root type from the Discoverable Partitions Specification).
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ROOT_X86_64_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"

# Host programs the disk steps run (rows of hadron.host's table).
HOST_TOOLS = ("sfdisk", "mkfs.fat", "mmd", "mcopy", "mkfs.ext4")

MIB = 1 << 20
MKE2FS = "/usr/bin/mke2fs"  # e2fsprogs' mke2fs in an image (busybox's applet, in /usr/sbin, has no -d)
_NAMESPACE = uuid.UUID("7d0b4c1e-5a2f-4c62-9a5e-4861647230e1")


@contextlib.contextmanager
def standard_umask() -> Iterator[None]:
    """Run a disk or boot step with umask 0022, whatever the caller's: the mount points, os-release
    and loader files it creates get the same modes on every machine (as a package build's do). A
    decorator too; it sets the process's umask, so disk steps do not run in parallel threads."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def stable_uuid(seed: str, what: str) -> str:
    """A UUID fixed by ``seed`` (e.g. the image key) and the role of the object."""
    return str(uuid.uuid5(_NAMESPACE, f"{seed}:{what}"))


@dataclass(frozen=True)
class Partition:
    name: str
    type_guid: str
    uuid: str
    size_mib: int
    image: Path | None = None  # file copied into the partition (a file system image)


FAT_EARLIEST = 315619200  # 1980-01-02: FAT stores no earlier date (and this holds in every time zone)


def make_esp(out: Path, files: Mapping[str, Path], *, size_mib: int = 64, label: str = "ESP",
             epoch: int = 0) -> None:
    """A FAT32 EFI system partition image holding ``files`` (destination path → source file).

    Byte-reproducible: mkfs.fat's invariant mode and fixed volume id, and every directory and file
    written in sorted order with its time set to ``epoch`` (mtools keeps a copied entry's time with
    -m; a directory made by mmd would get the current time, so directories are copied too)."""
    need = sum(p.stat().st_size for p in files.values())
    if need + 4 * MIB > size_mib * MIB:
        raise HadronError(f"EFI system partition of {size_mib} MiB is too small for {need / MIB:.1f} MiB of files",
                          hint="raise the ESP size")
    if out.exists():
        out.unlink()
    stamp = max(epoch, FAT_EARLIEST)
    # FAT32 needs at least ~33 MiB with 512-byte sectors; -i fixes the volume id.
    runner.run(["mkfs.fat", "--invariant", "-F", "32", "-n", label, "-i", "48414452", "-C", out,
                str(size_mib * 1024)])
    env = {"MTOOLS_SKIP_CHECK": "1", "TZ": "UTC"}
    dirs = sorted({"/".join(d.strip("/").split("/")[:i]) for d in files for i in range(1, d.strip("/").count("/") + 1)})
    with tempfile.TemporaryDirectory(prefix="esp-", dir=out.parent) as td:
        stage = Path(td)
        for n, d in enumerate(dirs):
            parent, _, base = d.rpartition("/")
            empty = stage / str(n) / base
            empty.mkdir(parents=True)
            os.utime(empty, (stamp, stamp))
            runner.run(["mcopy", "-s", "-m", "-i", out, empty, f"::/{parent}"], env=env)
        for n, dest in enumerate(sorted(files)):
            copy = stage / f"f{n}"
            shutil.copyfile(files[dest], copy)
            os.utime(copy, (stamp, stamp))
            runner.run(["mcopy", "-m", "-i", out, "-o", copy, f"::/{dest.strip('/')}"], env=env)


def make_root_fs(rootfs: Path, out: Path, *, label: str, fs_uuid: str | None = None, extra_mib: int = 128,
                 tools: Path | None = None, epoch: int = 0) -> int:
    """An ext4 image of ``rootfs`` (half again its size plus ``extra_mib``, at least 256 MiB); returns
    its size in MiB.

    With ``tools`` (an image tree holding e2fsprogs, normally the image being written), that image's
    own mke2fs makes it, run read-only in the sandbox with SOURCE_DATE_EPOCH = ``epoch``: with the
    fixed UUID and hash seed the file system is byte-reproducible (its creation and write times and
    every inode's times are ``epoch``). Otherwise the host's mkfs.ext4 makes it, which (Debian 12's
    1.47.0) stamps the time of the run and the tree's change times."""
    used = sum((Path(d) / f).lstat().st_size for d, _, fs in os.walk(rootfs) for f in fs)
    size_mib = max(256, int(used * 1.5 / MIB) + extra_mib)
    if out.exists():
        out.unlink()
    ids = ["-U", fs_uuid, "-E", f"root_owner=0:0,hash_seed={fs_uuid}"] if fs_uuid else ["-E", "root_owner=0:0"]
    args = ["-q", "-F", "-t", "ext4", "-L", label, *ids, "-T", "default"]
    if tools is not None and (tools / MKE2FS.lstrip("/")).is_file():
        env = sandbox.base_env(epoch, home="/tmp")
        step = sandbox.Step(argv=[MKE2FS, *args, "-d", "/tmp/tree", f"/tmp/out/{out.name}", f"{size_mib}M"],
                            mounts=[sandbox.Mount(rootfs, "/tmp/tree"),
                                    sandbox.Mount(out.parent, "/tmp/out", writable=True)],
                            env=env, cwd="/", root=tools)
        with tempfile.TemporaryFile() as log:
            status = sandbox.run(step, log)
            if status != 0:
                log.seek(0)
                out.unlink(missing_ok=True)
                raise HadronError(f"mke2fs (the image's own, {tools}) failed (exit status {status}):\n"
                                  + log.read().decode(errors="replace")[-2000:])
        return size_mib
    runner.run(["mkfs.ext4", *args, "-d", rootfs, out, f"{size_mib}M"])
    return size_mib


def make_gpt_disk(out: Path, partitions: Sequence[Partition], *, disk_uuid: str) -> None:
    """Write a GPT disk image with ``partitions`` (1 MiB aligned, in order) and copy their images in."""
    total = 1 + sum(p.size_mib for p in partitions) + 1  # 1 MiB for the primary and backup tables
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as f:
        f.truncate(total * MIB)
    script = [f"label: gpt\nlabel-id: {disk_uuid}\nunit: sectors\nfirst-lba: 2048\n"]
    start = 1
    for p in partitions:
        script.append(f"start={start * 2048}, size={p.size_mib * 2048}, type={p.type_guid}, uuid={p.uuid}, "
                      f'name="{p.name}"\n')
        start += p.size_mib
    try:
        runner.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", tmp], input="".join(script))
        start = 1
        for p in partitions:
            if p.image is not None:
                size = p.image.stat().st_size
                if size > p.size_mib * MIB:
                    raise HadronError(f"{p.image} ({size} bytes) does not fit partition {p.name!r} ({p.size_mib} MiB)")
                with open(p.image, "rb") as src, open(tmp, "r+b") as dst:
                    dst.seek(start * MIB)
                    shutil.copyfileobj(src, dst, 4 * MIB)
            start += p.size_mib
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class PartitionEntry:
    start: int  # first LBA (512-byte sectors)
    sectors: int
    type_guid: str
    uuid: str


def partition_table(image: Path) -> list[PartitionEntry]:
    """The GPT partitions of a disk image, as sfdisk reads them."""
    res = runner.run(["sfdisk", "--json", image], what=f"reading the partition table of {image}")
    return [PartitionEntry(p["start"], p["size"], p["type"], p["uuid"])
            for p in json.loads(res.stdout)["partitiontable"]["partitions"]]
