"""Initrd archives: a tree as a newc cpio (uid/gid 0, times set to the build epoch, sorted names),
zstd-compressed, so the same tree always gives the same bytes; and the repacking of an archive
another tool wrote (dracut from the image, whose busybox cpio stamps the time of the run)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hadron import runner
from hadron.errors import HadronError

# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("cpio", "zstd")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def pack(tree: Path, out: Path, *, epoch: int) -> int:
    """Write ``tree`` to ``out`` as a reproducible zstd-compressed newc cpio; returns its size."""
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    for p in [tree, *tree.rglob("*")]:
        os.utime(p, (epoch, epoch), follow_symlinks=False)
    with tempfile.TemporaryDirectory(prefix="initrd-", dir=out.parent) as td:
        raw = Path(td) / "initrd.cpio"
        with open(raw, "wb") as f:
            runner.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"], cwd=tree,
                       input="\n".join(names), stdout=f, what="archiving the initrd")
        tmp = out.with_name(out.name + ".part")
        try:
            runner.run(["zstd", "-q", "-f", "-19", "-T0", raw, "-o", tmp], what="compressing the initrd")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    return out.stat().st_size


def repack(archive: Path, *, epoch: int) -> int:
    """Rewrite a zstd-compressed cpio initramfs in place with :func:`pack`: same files, modes,
    owners (0) and content; times and order made reproducible."""
    with archive.open("rb") as f:
        if f.read(4) != ZSTD_MAGIC:
            raise HadronError(f"{archive}: not a zstd-compressed initramfs, cannot make it reproducible",
                              hint="configure dracut with compress=\"zstd\" and without an early cpio")
    with tempfile.TemporaryDirectory(prefix="initrd-", dir=archive.parent) as td:
        raw = Path(td) / "initramfs.cpio"
        runner.run(["zstd", "-q", "-d", "-f", archive, "-o", raw], what="decompressing the initramfs")
        tree = Path(td) / "tree"
        tree.mkdir()
        with raw.open("rb") as f:
            runner.run(["cpio", "--quiet", "-i", "-d", "-m", "--no-absolute-filenames"], cwd=tree, stdin=f,
                       what="unpacking the initramfs")
        raw.unlink()
        return pack(tree, archive, epoch=epoch)
