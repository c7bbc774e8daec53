"""The cache layout's ownership rules, with real processes and real flocks: gc never takes what a
live process holds, concurrent builds of one image publish it once and never replace it, and
``cache verify`` / ``cache gc`` cover images."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Project, add_image
from hadron.layout import CacheLayout

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")

# A separate process that holds what a running command holds, until it is killed:
# "work PREFIX": a work directory (with a file in it); "lock PATH": one lock file.
HOLDER = """
import sys
from pathlib import Path
from hadron import layout
root, what, arg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
if what == "work":
    with layout.CacheLayout(root).work_dir(arg) as work:
        (work / "disk.raw").write_bytes(bytes(4096))
        print(work, flush=True)
        sys.stdin.read()
else:
    with layout.hold(Path(arg)):
        print(arg, flush=True)
        sys.stdin.read()
"""


@contextlib.contextmanager
def holder(cache: Path, what: str, arg: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Start a holder process; yields it and the path it holds once it holds it. Killed on exit."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(cache), what, arg], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        assert line, "the holder process failed to start"
        yield p, Path(line)
    finally:
        p.kill()
        p.wait()


def gc_removed(p: Project) -> int:
    res = p.hadron("cache", "gc", "--json", check=True)
    removed = json.loads(res.stdout)["removed"]
    assert isinstance(removed, int)
    return removed


def test_gc_spares_a_running_boots_work_dir_and_removes_it_once_the_boot_is_killed(project: Project) -> None:
    layout = CacheLayout(project.cache)
    with holder(project.cache, "work", "grub-boot") as (boot, work):
        assert work.parent == layout.run and (work / "disk.raw").is_file()
        assert gc_removed(project) == 0
        assert (work / "disk.raw").read_bytes() == bytes(4096)
        boot.send_signal(signal.SIGKILL)
        boot.wait()
    assert boot.returncode == -signal.SIGKILL
    assert (work / "disk.raw").is_file()  # killed: it cleaned nothing up
    assert gc_removed(project) == 1
    assert not work.exists() and list(layout.run.iterdir()) == []


def test_gc_removes_only_tmp_entries_of_dead_builds_and_leaves_unknown_names(project: Project) -> None:
    layout = CacheLayout(project.cache)
    dead, live = "a" * 64, "b" * 64
    stale = layout.new_build_tmp(dead)
    running = layout.new_image_tmp(live)
    foreign = layout.tmp / "grub-boot-x1y2"  # not a name the layout makes: no owner can be derived
    for d in (stale, running, foreign):
        d.mkdir(parents=True)
        (d / "f").write_text("x")
    with holder(project.cache, "lock", str(layout.image_lock(live))):
        assert gc_removed(project) == 1
        assert not stale.exists() and (running / "f").is_file() and (foreign / "f").is_file()
    assert gc_removed(project) == 1
    assert not running.exists() and (foreign / "f").is_file()


def test_work_dir_is_private_and_removed_on_exit_error_and_interrupt(tmp_path: Path) -> None:
    layout = CacheLayout(tmp_path / "cache")
    paths = []
    for exc in (None, RuntimeError("boom"), KeyboardInterrupt()):
        with contextlib.suppress(RuntimeError, KeyboardInterrupt), layout.work_dir("boot") as work:
            paths.append(work)
            assert stat.S_IMODE(work.stat().st_mode) == 0o700
            (work / "ro").mkdir()
            (work / "ro" / "f").write_text("x")
            (work / "ro").chmod(0o500)  # removal copes with read-only directories
            if exc is not None:
                raise exc
        assert not work.exists()
    assert len(set(paths)) == 3
    assert list(layout.run.iterdir()) == []


def test_reap_keeps_a_held_lock_without_its_directory_yet(tmp_path: Path) -> None:
    """A command locks its work directory's lock file before making the directory: gc must not take
    such a lock file, but removes free lock files and directories that lost their lock file."""
    layout = CacheLayout(tmp_path / "cache")
    layout.run.mkdir(parents=True)
    held, free, orphan = layout.run / "boot.1.1.lock", layout.run / "boot.2.2.lock", layout.run / "boot.3.3"
    fd = os.open(held, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        free.touch()
        orphan.mkdir()
        assert layout.reap_work_dirs() == (1, 0)
        assert held.exists() and not free.exists() and not orphan.exists()
    finally:
        os.close(fd)
    assert layout.reap_work_dirs() == (0, 0)
    assert list(layout.run.iterdir()) == []


class FirstPublication:
    """Watches images/ from a thread: the first image directory to appear, its inode, and an open
    file of it (a reader, as a boot or a push would be)."""

    def __init__(self, images: Path, file: str) -> None:
        self.images = images
        self.file = file
        self.path: Path | None = None
        self.inode = 0
        self.fd: int | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                for p in self.images.iterdir():
                    if not re.fullmatch("[0-9a-f]{64}", p.name):
                        continue  # not an image key: not a published image
                    self.inode = p.stat().st_ino
                    self.fd = os.open(p / self.file, os.O_RDONLY)
                    self.path = p
                    return
            time.sleep(0.002)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        if self.fd is not None:
            os.close(self.fd)


def assert_reader_undisturbed(pub: FirstPublication) -> None:
    """The published directory and the reader's open file are still the ones at their paths."""
    assert pub.path is not None and pub.fd is not None
    assert pub.path.stat().st_ino == pub.inode, "the published image directory was replaced"
    held = os.fstat(pub.fd)
    assert held.st_nlink == 1, "a file of the published image was deleted under its reader"
    assert os.path.samestat(held, os.stat(pub.path / pub.file))


def add_payload(p: Project, image: str, mib: int) -> None:
    """Give ``image`` a files/ tree with ``mib`` MiB of random data: assembling it then takes about
    a second, far longer than the spread in start-up time of two processes started together."""
    images = p.root / "distro" / "images"
    (images / image).mkdir()
    (images / f"{image}.toml").rename(images / image / "image.toml")
    payload = images / image / "files" / "usr" / "share" / "payload"
    payload.parent.mkdir(parents=True)
    payload.write_bytes(os.urandom(mib << 20))


@needs_bwrap
def test_two_concurrent_builds_of_one_image_publish_it_once(mini: Project) -> None:
    add_payload(mini, "mini", 24)
    mini.hadron("build", "hello", check=True)  # packages cached: both image builds start at once
    pub = FirstPublication(mini.cache / "images", "rootfs/usr/bin/hello")
    try:
        procs = [mini.popen("build", "mini", "--json") for _ in range(2)]
        infos = []
        for p in procs:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
            infos.append(json.loads(out)["images"]["mini"])
        a, b = infos
        assert a["key"] == b["key"] and a["path"] == b["path"]
        assert sorted([a["cached"], b["cached"]]) == [False, True]  # assembled once
        path = Path(a["path"])
        assert [p.name for p in (mini.cache / "images").iterdir()] == [path.name]
        assert list((mini.cache / "tmp").iterdir()) == []
        assert_reader_undisturbed(pub)
    finally:
        pub.close()


@needs_bwrap
def test_a_second_assembly_of_a_published_image_is_discarded_not_swapped_in(mini: Project) -> None:
    """A second build of the same key that raced past the cache lookup: its work is discarded and the
    published image returned, while a reader holds a file of it open."""
    from hadron.config import load_settings
    from hadron.context import Context
    from hadron.image.build import assemble_image, image_outputs, image_packages

    first = json.loads(mini.hadron("build", "mini", "--json", check=True).stdout)["images"]["mini"]
    pub = FirstPublication(mini.cache / "images", "rootfs/usr/bin/hello")
    try:
        pub.thread.join(timeout=10)
        assert pub.path == Path(first["path"])
        ctx = Context(load_settings(project=mini.root, cache_dir=mini.cache))
        outputs, _keys = ctx.planner.resolve_cached(image_packages(ctx, ctx.images["mini"]))
        mine = image_outputs(ctx, "mini", outputs)
        assert mine is not None
        with ctx.cache.image_lock(first["key"]):
            again = assemble_image(ctx, "mini", first["key"], mine, quiet=True)
        assert again.path == pub.path and again.cached
        assert [p.name for p in (mini.cache / "images").iterdir()] == [first["key"]]
        assert list((mini.cache / "tmp").iterdir()) == []
        assert_reader_undisturbed(pub)
    finally:
        pub.close()


@needs_bwrap
def test_verify_names_changed_image_files_and_gc_removes_an_image_no_longer_current(mini: Project) -> None:
    info = json.loads(mini.hadron("build", "mini", "--json", check=True).stdout)["images"]["mini"]
    path = Path(info["path"])
    assert mini.hadron("cache", "verify").returncode == 0
    binary = path / "rootfs/usr/bin/hello"
    data = bytearray(binary.read_bytes())
    data[len(data) // 2] ^= 1
    mode = stat.S_IMODE(binary.stat().st_mode)
    binary.chmod(mode | stat.S_IWUSR)
    binary.write_bytes(bytes(data))
    binary.chmod(mode)
    res = mini.hadron("cache", "verify")
    assert res.returncode == 1
    assert f"CORRUPT {binary}: content changed" in res.stderr
    (path / "rootfs/extra").write_text("x")
    (path / "docker-archive.tar").unlink()
    res = mini.hadron("cache", "verify")
    assert res.returncode == 1
    assert f"CORRUPT {path / 'rootfs/extra'}: not in the manifest" in res.stderr
    assert f"CORRUPT {path / 'docker-archive.tar'}: missing" in res.stderr

    assert gc_removed(mini) == 0 and path.is_dir()  # still the current image
    add_image(mini, "mini", ["hello"], 'setuid_allowed = ["usr/bin/none"]\n')  # a new image key
    assert gc_removed(mini) == 1
    assert not path.exists() and list((mini.cache / "images").iterdir()) == []
    assert len(list((mini.cache / "outputs").iterdir())) == 1  # the package output is still current
    assert list((mini.cache / "tmp").iterdir()) == []
