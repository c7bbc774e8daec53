"""scripts/host-setup on a bare Debian 12: everything Hadron needs is installed by set-up alone.

A minimal Debian 12 root (mmdebstrap, variant minbase: no python3, no pip, no compiler) from the
host's own Debian apt sources gets a copy of this working tree at /src/hadron. scripts/host-setup
runs inside it; then `hadron host check --all` must find every program the images, toolchain
profiles, disks and boot paths need, `hadron` must run from /usr/local/bin, the README's test
command must start, a second set-up must be a quick silent no-op, and set-up from another clone must
point the editable install at that clone.

Every command inside the root runs in a private mount namespace (proc, sysfs, /dev, /dev/pts and an
overlay of the host's apt archive cache mounted there), so nothing stays mounted on the host even
if the test is killed; services cannot start (policy-rc.d exits 101). The root is deleted in all
cases. Needs root, mmdebstrap, and the network (the host's apt sources, PyPI); run with
`scripts/test -m bare -s tests/test_bare_host.py`.
"""

from __future__ import annotations

import configparser
import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import pytest

from hadron.config import cache_root
from hadron.engine import buildenv
from hadron.engine.mirrors import debian_binary_sources
from hadron.layout import CacheLayout

HOST_CHECK = ["hadron", "host", "check", "--all"]

SUITE = "bookworm"
REPO = Path(__file__).resolve().parents[1]
INNER_REPO = "/src/hadron"
INNER_CLONE = "/src/hadron-clone"
HOST_APT_ARCHIVES = Path("/var/cache/apt/archives")
ROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
# When the host names a certificate bundle for pip or Python (PIP_CERT, SSL_CERT_FILE, pip's
# global.cert), the root gets a copy here and uses it too: set-up inside trusts what the host trusts.
INNER_CA_BUNDLE = "/etc/ssl/host-ca-bundle.pem"
TAIL_LINES = 60

# Budgets in seconds for each phase; the whole test is bounded by their sum.
MMDEBSTRAP_TIMEOUT = 900
SETUP_TIMEOUT = 2400
CHECK_TIMEOUT = 600
NOOP_SETUP_SECONDS = 30.0

pytestmark = [
    pytest.mark.bare,
    pytest.mark.timeout(MMDEBSTRAP_TIMEOUT + 2 * SETUP_TIMEOUT + 4 * CHECK_TIMEOUT),
]

# Run inside a private mount namespace: mount what the chroot needs, then chroot. $1 is the root,
# $2 the apt cache overlay's upper directory (empty: none), $3 its work directory; the rest is the
# command. The mounts vanish with the namespace when the command ends.
ENTER_ROOT = r"""
set -eu
root=$1 upper=$2 work=$3
shift 3
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
if [ -n "$upper" ]; then
  mount -t overlay overlay -o "lowerdir=$HOST_ARCHIVES,upperdir=$upper,workdir=$work" \
    "$root/var/cache/apt/archives"
fi
exec chroot "$root" "$@"
"""


@dataclass
class Result:
    what: str
    cmd: list[str]
    status: str
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "exit status 0"

    def describe(self) -> str:
        lines = self.output.rstrip().splitlines()
        tail = "\n".join(lines[-TAIL_LINES:]) if lines else "(no output)"
        return (f"{self.what}: `{' '.join(self.cmd)}` ended with {self.status} after {self.seconds:.0f} s; "
                f"last {min(len(lines), TAIL_LINES)} lines of its output:\n{tail}")


def run(what: str, cmd: list[str], log: Path, timeout: float, stdin: str | None = None,
        env: dict[str, str] | None = None) -> Result:
    """Run cmd in its own session, output to log; kill the whole session on timeout or interrupt."""
    start = time.monotonic()
    with open(log, "w+") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env,
        )
        try:
            proc.communicate(stdin, timeout=timeout)
            status = f"exit status {proc.returncode}"
        except subprocess.TimeoutExpired:
            status = f"a timeout ({timeout:.0f} s)"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        output = out.read()
    return Result(what, cmd, status, output, time.monotonic() - start)


# --- the root ---------------------------------------------------------------------------------


def repo_files() -> list[str]:
    """Tracked files plus untracked ones not ignored, as they are in the working tree."""
    res = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    names = sorted({n for n in res.stdout.decode().split("\0") if n})
    return [n for n in names if os.path.lexists(REPO / n) and not (REPO / n).is_dir()]


def copy_repo(dest: Path) -> int:
    files = repo_files()
    for name in files:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return len(files)


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
        if point == prefix.rstrip("/") or point.startswith(prefix):
            found.append(point)
    return found


def kill_processes_in(root: Path) -> None:
    """SIGKILL every process whose root directory is inside root."""
    prefix = str(root).rstrip("/")
    for _ in range(50):
        victims = []
        for entry in glob.glob("/proc/[0-9]*/root"):
            with contextlib.suppress(OSError):
                target = os.readlink(entry)
                if target == prefix or target.startswith(prefix + "/"):
                    victims.append(int(entry.split("/")[2]))
        if not victims:
            return
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def remove_work(work: Path) -> None:
    kill_processes_in(work / "root")
    for point in sorted(mounts_under(work), key=len, reverse=True):
        subprocess.run(["umount", "--recursive", "--lazy", point], capture_output=True)
    left = mounts_under(work)
    assert not left, f"still mounted, {work} left in place: {left}"
    subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=True)


def layer_members(oci_layout: Path) -> dict[str, tuple[object, ...]]:
    """Every member of an environment image's single layer: type, mode, mtime, size, link and content digest."""
    index = json.loads((oci_layout / "index.json").read_text())
    blob = oci_layout / "blobs" / "sha256"
    manifest = json.loads((blob / index["manifests"][0]["digest"].removeprefix("sha256:")).read_text())
    layer = blob / manifest["layers"][0]["digest"].removeprefix("sha256:")
    members: dict[str, tuple[object, ...]] = {}
    with tarfile.open(layer, mode="r:*") as tf:
        for m in tf:
            f = tf.extractfile(m) if m.isreg() else None
            content = hashlib.sha256(f.read()).hexdigest()[:12] if f is not None else ""
            members[m.name] = (m.type, oct(m.mode), m.mtime, m.size, m.linkname, content)
    return members


def environment_differences(built: Path, locked: Path, limit: int = 12) -> str:
    """How the environment a bare root built differs from the locked one this host has, file by file."""
    a, b = layer_members(built / "oci"), layer_members(locked / "oci")
    out = [f"only in the bare root's: {n}" for n in sorted(a.keys() - b.keys())]
    out += [f"only in the locked one: {n}" for n in sorted(b.keys() - a.keys())]
    out += [f"{n}: {a[n]} vs {b[n]}" for n in sorted(a.keys() & b.keys()) if a[n] != b[n]]
    if not out:
        return "the layers hold the same files; the image configs or manifests differ"
    return f"{len(out)} differences: " + "; ".join(out[:limit])


def host_ca_bundle() -> Path | None:
    """The certificate bundle the host's pip and Python use, if the host names one."""
    for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        value = os.environ.get(name)
        if value and Path(value).is_file():
            return Path(value)
    home = Path.home()
    files = [os.environ.get("PIP_CONFIG_FILE", ""), "/etc/pip.conf", "/etc/xdg/pip/pip.conf",
             f"{home}/.config/pip/pip.conf", f"{home}/.pip/pip.conf"]
    for path in filter(None, files):
        config = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(OSError, configparser.Error):
            config.read(path)
        cert = config["global"].get("cert", "") if config.has_section("global") else ""
        if cert and Path(cert).is_file():
            return Path(cert)
    return None


def du_bytes(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def _control_stanzas(path: Path) -> Iterator[dict[str, str]]:
    with open(path, errors="replace") as f:
        fields: dict[str, str] = {}
        for line in f:
            if line == "\n":
                if fields:
                    yield fields
                fields = {}
            elif line[0] not in " \t" and ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields:
            yield fields


def installed_packages(root: Path) -> set[tuple[str, str, str]]:
    """(package, version, architecture) of everything dpkg has installed in root."""
    return {(s["Package"], s.get("Version", ""), s.get("Architecture", ""))
            for s in _control_stanzas(root / "var/lib/dpkg/status") if s.get("Status", "").endswith(" installed")}


def download_bytes(root: Path, packages: set[tuple[str, str, str]]) -> int:
    """What downloading packages costs, per the Size fields of root's apt lists."""
    sizes: dict[tuple[str, str, str], int] = {}
    for lst in (root / "var/lib/apt/lists").glob("*_Packages"):
        for s in _control_stanzas(lst):
            key = (s.get("Package", ""), s.get("Version", ""), s.get("Architecture", ""))
            if key in packages and s.get("Size", "").isdigit():
                sizes[key] = int(s["Size"])
    return sum(sizes.values())


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class Root:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.path = work / "root"
        self.logs = work / "logs"
        self.logs.mkdir()
        self.upper = work / "apt-upper"
        self.overlay_work = work / "apt-work"
        self.phases: list[tuple[str, float]] = []
        self.notes: list[str] = []
        self._n = 0
        self.env = {**ROOT_ENV, **{k: v for k, v in os.environ.items() if k in PROXY_VARS}}

    def host(self, what: str, cmd: list[str], timeout: float, stdin: str | None = None) -> Result:
        self._n += 1
        return run(what, cmd, self.logs / f"{self._n:02d}.log", timeout, stdin=stdin)

    def inside(self, what: str, cmd: list[str], timeout: float = CHECK_TIMEOUT, cwd: str = INNER_REPO) -> Result:
        cache = HOST_APT_ARCHIVES.is_dir()
        upper, ovl = (str(self.upper), str(self.overlay_work)) if cache else ("", "")
        full = ["unshare", "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", ENTER_ROOT, "enter-root", str(self.path), upper, ovl,
                "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in self.env.items()), "/usr/bin/env", "-C", cwd, *cmd]
        self._n += 1
        res = run(what, full, self.logs / f"{self._n:02d}.log", timeout,
                  env={"PATH": ROOT_ENV["PATH"], "HOST_ARCHIVES": str(HOST_APT_ARCHIVES)})
        res.cmd = cmd
        return res

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - start
            self.phases.append((name, seconds))
            print(f"bare host: {name}: {seconds:.1f} s", flush=True)

    def report(self) -> None:
        total = sum(s for _, s in self.phases)
        print("bare host: phases: " + ", ".join(f"{n} {s:.1f} s" for n, s in self.phases) + f"; total {total:.1f} s")
        for note in self.notes:
            print(f"bare host: {note}")


@pytest.fixture
def bare_root() -> Iterator[Root]:
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap, chroot and mounts)")
    found = {"mmdebstrap": shutil.which("mmdebstrap"), "git": shutil.which("git"),
             "unshare": shutil.which("unshare"), "chroot": shutil.which("chroot")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/host-setup installs them)")
    if not (REPO / ".git").exists():
        pytest.skip("needs a git working tree to copy")
    if not debian_binary_sources(SUITE):
        pytest.skip(f"the host's apt configuration has no Debian {SUITE} sources")
    with sigterm_as_interrupt():
        work = Path(tempfile.mkdtemp(prefix="hadron-bare-", dir="/var/tmp"))
        root = Root(work)
        try:
            yield root
        finally:
            try:
                with root.phase("cleanup"):
                    remove_work(work)
            finally:
                root.report()


def test_host_setup_on_bare_debian(bare_root: Root) -> None:
    r = bare_root

    with r.phase("mmdebstrap"):
        res = r.host("mmdebstrap", ["unshare", "--mount", "--propagation", "private", "--",
                                    "mmdebstrap", "--mode=root", "--variant=minbase", "--verbose",
                                    SUITE, str(r.path), "-"],
                     MMDEBSTRAP_TIMEOUT, stdin=debian_binary_sources(SUITE))
        assert res.ok, res.describe()
        sizes = re.findall(r"^(?:Need to get|Fetched) .*$", res.output, re.M)
        r.notes.append(f"mmdebstrap downloads: {'; '.join(sizes) or 'not reported'}")

    with r.phase("prepare"):
        for tool in ("python3", "pip3", "gcc", "cc"):
            assert not list(r.path.glob(f"usr/bin/{tool}")), f"the minbase root already has /usr/bin/{tool}"
        policy = r.path / "usr/sbin/policy-rc.d"
        policy.write_text("#!/bin/sh\n# no services start inside this root\nexit 101\n")
        policy.chmod(0o755)
        resolv = r.path / "etc/resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        resolv.write_text(Path("/etc/resolv.conf").read_text())
        bundle = host_ca_bundle()
        if bundle is not None:
            inner = r.path / INNER_CA_BUNDLE.lstrip("/")
            inner.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, inner)
            r.env.update(PIP_CERT=INNER_CA_BUNDLE, SSL_CERT_FILE=INNER_CA_BUNDLE)
            r.notes.append(f"the host's certificate bundle {bundle} is trusted inside (PIP_CERT, SSL_CERT_FILE)")
        (r.path / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
        r.upper.mkdir()
        r.overlay_work.mkdir()
        n = copy_repo(r.path / INNER_REPO.lstrip("/"))
        r.notes.append(f"copied {n} files of the working tree to {INNER_REPO}")
        base = installed_packages(r.path)

    with r.phase("host-setup"):
        res = r.inside("host-setup", ["scripts/host-setup"], timeout=SETUP_TIMEOUT)
        assert res.ok, res.describe()
        added = installed_packages(r.path) - base
        debs = list(r.upper.glob("*.deb"))
        venvs = [p for p in (r.path / "opt/hadron").rglob("*") if p.is_file() and not p.is_symlink()]
        mb = download_bytes(r.path, added) / 1e6
        cached = (f"{len(debs)} files ({du_bytes(debs) / 1e6:.0f} MB) were not in the host's apt cache"
                  if HOST_APT_ARCHIVES.is_dir() else "no host apt cache")
        r.notes.append(f"host-setup installed {len(added)} Debian packages, {mb:.0f} MB to download ({cached}); "
                       f"/opt/hadron holds {du_bytes(venvs) / 1e6:.0f} MB of venvs")

    with r.phase("checks"):
        res = r.inside("hadron link", ["readlink", "-f", "/usr/local/bin/hadron"])
        assert res.ok and res.output.strip() == "/opt/hadron/venv/bin/hadron", res.describe()
        res = r.inside("hadron --version", ["hadron", "--version"])
        assert res.ok and "version" in res.output, res.describe()
        res = r.inside("host check", HOST_CHECK)
        assert res.ok, res.describe()
        r.notes += [f"{' '.join(HOST_CHECK)}: {line}" for line in res.output.splitlines()]
        res = r.inside("test collection", ["scripts/test", "--co", "-q", "tests/test_recipe.py"])
        m = re.search(r"^(\d+) tests? collected", res.output, re.M)
        assert res.ok and m and int(m.group(1)) > 0, res.describe()

    with r.phase("build environment"):
        # The main command's first step on a fresh machine: the hermetic build environment.
        res = r.inside("hadron buildenv build", ["hadron", "buildenv", "build", "--cache-dir", "/var/tmp/bare-cache",
                                                "--json"], timeout=SETUP_TIMEOUT)
        doc = next((json.loads(line) for line in res.output.splitlines() if line.startswith("{")), None)
        assert doc is not None and doc["digest"].startswith("sha256:"), res.describe()
        assert res.ok or doc["differences"], res.describe()  # exit 1 only names how it differs from the lock
        r.notes.append(f"build environment {doc['digest']}: "
                       + ("the one buildenv.lock names" if doc["matches_lock"] else
                          f"differs from buildenv.lock: {'; '.join(doc['differences'][:5]) or 'same packages'}"))
        lock = buildenv.read_lock(REPO)
        locked = buildenv.find(CacheLayout(cache_root(REPO, None)), lock.digest) if lock is not None else None
        if not doc["matches_lock"] and locked is not None:
            built = r.path / "var/tmp/bare-cache/buildenv" / doc["digest"].removeprefix("sha256:")
            why = environment_differences(built, locked.path)
            r.notes.append(f"against the locked environment in this host's cache: {why}")

    with r.phase("host-setup again"):
        res = r.inside("second host-setup", ["scripts/host-setup"], timeout=SETUP_TIMEOUT)
        assert res.ok, res.describe()
        assert res.output == "", f"a second host-setup is not silent:\n{res.describe()}"
        assert res.seconds < NOOP_SETUP_SECONDS, f"a second host-setup is not quick:\n{res.describe()}"

    with r.phase("another clone"):
        res = r.inside("copy", ["cp", "-a", INNER_REPO, INNER_CLONE], cwd="/")
        assert res.ok, res.describe()
        res = r.inside("host-setup from another clone", ["scripts/host-setup"], timeout=SETUP_TIMEOUT,
                       cwd=INNER_CLONE)
        assert res.ok, res.describe()
        probe = ["/opt/hadron/venv/bin/python", "-c", "import hadron; print(hadron.__file__)"]
        res = r.inside("editable install", probe)
        assert res.ok and res.output.strip() == f"{INNER_CLONE}/src/hadron/__init__.py", res.describe()
