"""The hermetic build environment: the root every package build step runs in, identified by digest.

``hadron buildenv build`` makes it with mmdebstrap: a minimal Debian 12 (variant minbase) with
exactly the packages of the build-environment section of ``host-packages.tsv``, plus the tools venv
(``/opt/hadron/tools``: meson, jinja2, pyelftools from wheels downloaded and hashed on the host,
installed without network and without byte-compiling). The tree is written as an OCI image with
one reproducible layer; the manifest digest is the environment's identity. ``buildenv.lock`` at the
project root records that digest, the wheels and their sha256, and every Debian package with its
version, so a rebuild can be compared package by package.

Package builds use the environment's unpacked tree as their read-only sandbox root, and cache keys
hash its digest instead of the host's programs: two machines with the same environment digest
compute the same keys. An environment comes from the cache (``buildenv/<digest>/``), else from the
registry named by ``[buildenv] remote`` in hadron.toml (pulled by digest), else it is built here;
a locally built environment whose digest differs from the lock is used with a warning that names
the packages that differ (``--locked`` refuses it instead).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hadron import runner
from hadron.engine.fetch import file_sha256
from hadron.engine.mirrors import debian_binary_sources
from hadron.errors import HadronError
from hadron.host import build_env_packages, sandbox_path
from hadron.image import oci
from hadron.layout import CacheLayout, remove_tree

SUITE = "bookworm"
LOCK_FILE = "buildenv.lock"
TAG = "buildenv"
TOOLS_VENV = "/opt/hadron/tools"
# Python tools the recipes run (systemd's meson needs a newer meson than Debian 12's, jinja2 and
# pyelftools); the lock pins each to a version and a wheel digest.
TOOLS_REQUIREMENTS = ("meson", "jinja2", "pyelftools")
# Mount points the sandbox binds over (made in the tree: its root is read-only).
MOUNT_POINTS = ("src", "build", "destdir", "sysroot", "recipe", "sources")
# Host programs this module runs (rows of hadron.host's table).
HOST_TOOLS = ("mmdebstrap", "unshare", "mount", "skopeo", "tar")
MMDEBSTRAP_TIMEOUT = 1800
# Inside the tree (so covered by the digest): what it was made from.
DESCRIPTION = "usr/share/hadron/buildenv.json"


@dataclass(frozen=True)
class EnvLock:
    """``buildenv.lock``: what the project's build environment is."""

    digest: str  # sha256:<hex> of the OCI manifest
    suite: str
    epoch: int
    packages: tuple[str, ...]  # requested (the table's build-environment section)
    wheels: dict[str, str]  # wheel file name -> sha256
    installed: dict[str, str]  # every Debian package in the tree -> version

    @property
    def hex(self) -> str:
        return self.digest.removeprefix("sha256:")

    def to_json(self) -> str:
        doc = {
            "comment": "Written by `hadron buildenv build --update-lock`. The digest names the build "
            "environment every package build runs in; cache keys hash it.",
            "digest": self.digest,
            "suite": self.suite,
            "source_date_epoch": self.epoch,
            "packages": list(self.packages),
            "wheels": dict(sorted(self.wheels.items())),
            "installed": dict(sorted(self.installed.items())),
        }
        return json.dumps(doc, indent=1) + "\n"


def lock_path(project: Path) -> Path:
    return project / LOCK_FILE


def read_lock(project: Path) -> EnvLock | None:
    path = lock_path(project)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        lock = EnvLock(
            digest=str(doc["digest"]),
            suite=str(doc["suite"]),
            epoch=int(doc["source_date_epoch"]),
            packages=tuple(doc["packages"]),
            wheels=dict(doc["wheels"]),
            installed=dict(doc["installed"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise HadronError(f"{path}: unreadable build environment lock: {e!r}",
                          hint="restore it from version control, or run `hadron buildenv build --update-lock`",
                          ) from None
    if not lock.digest.startswith("sha256:") or len(lock.hex) != 64:
        raise HadronError(f"{path}: digest: not a sha256 digest: {lock.digest!r}")
    return lock


@dataclass(frozen=True)
class BuildEnv:
    """A build environment in the cache."""

    digest: str
    path: Path

    @property
    def root(self) -> Path:
        return self.path / "rootfs"

    @property
    def oci(self) -> Path:
        return self.path / "oci"

    def record(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.path / "env.json").read_text())
        return data

    def lock(self) -> EnvLock:
        """The lock that describes this environment, from the description inside its tree."""
        d = json.loads((self.root / DESCRIPTION).read_text())
        return EnvLock(self.digest, d["suite"], int(d["source_date_epoch"]), tuple(d["packages"]),
                       dict(d["wheels"]), dict(d["installed"]))

    def resolve(self, path: str) -> Path | None:
        """``path`` (absolute, as seen inside) resolved within the tree, following symbolic links
        as the sandbox would; None when it does not exist."""
        parts = [p for p in path.split("/") if p]
        cur = self.root
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                cur = cur.parent if cur != self.root else cur
                continue
            nxt = cur / part
            if nxt.is_symlink():
                hops += 1
                if hops > 40:
                    return None
                target = os.readlink(nxt)
                parts = [p for p in target.split("/") if p] + parts
                if target.startswith("/"):
                    cur = self.root
                continue
            if not nxt.exists():
                return None
            cur = nxt
        return cur

    def which(self, tool: str, search_path: str) -> str | None:
        if tool.startswith("/"):
            return tool if self.resolve(tool) is not None else None
        for d in search_path.split(":"):
            found = self.resolve(f"{d}/{tool}")
            if found is not None and found.is_file() and os.access(found, os.X_OK):
                return f"{d}/{tool}"
        return None


def extra_path(project_path: tuple[str, ...]) -> tuple[str, ...]:
    """What a build step on the environment searches before the standard PATH: the project's
    ``[build_env] path``, then the environment's own tools venv (meson, jinja2, pyelftools), each
    once. The environment brings its tools: a project need not name them to build what another built."""
    return tuple(dict.fromkeys([*project_path, f"{TOOLS_VENV}/bin"]))


def search_path(project_path: tuple[str, ...]) -> str:
    return sandbox_path(extra_path(project_path))


class LockedIdentity:
    """Identity of builds run in a build environment: its digest and the PATH steps search in it
    (a project's ``[build_env] path`` decides which meson runs), whatever tools a recipe names."""

    def __init__(self, env: BuildEnv, search_path: str) -> None:
        self.env = env
        self.path = search_path

    @property
    def root(self) -> Path:
        return self.env.root

    def which(self, tool: str) -> str | None:
        return self.env.which(tool, self.path)

    def missing(self, tools: list[str]) -> list[str]:
        return [t for t in tools if self.which(t) is None]

    def identity(self, tools: list[str]) -> str:
        if self.path == search_path(()):
            return f"buildenv:{self.env.digest}"
        return f"buildenv:{self.env.digest} PATH={self.path}"

    def save(self) -> None:
        pass


def find(layout: CacheLayout, digest: str) -> BuildEnv | None:
    path = layout.buildenv(digest.removeprefix("sha256:"))
    if (path / "env.json").is_file():
        return BuildEnv(digest, path)
    return None


def installed_packages(root: Path) -> dict[str, str]:
    """Package -> version of every installed package, from the tree's dpkg status file."""
    out: dict[str, str] = {}
    for stanza in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line[0].isspace())
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            arch = fields.get("Architecture", "")
            name = fields["Package"] + (f":{arch}" if arch not in ("", "all", "amd64") else "")
            out[name] = fields["Version"]
    return out




def _download_wheels(dest: Path, pins: dict[str, str] | None) -> dict[str, str]:
    """Wheels of the tools venv (and pip, to install them), downloaded on the host with this
    interpreter's pip; with ``pins`` (file -> sha256 from the lock), exactly those files."""
    dest.mkdir(parents=True)
    if pins:
        reqs = [_requirement_of(f) for f in sorted(pins)]
        extra = ["--no-deps"]
    else:
        reqs = ["pip", *TOOLS_REQUIREMENTS]
        extra = []
    runner.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", "--dest", str(dest), *extra, *reqs],
               what="pip download (build environment tools)", timeout=900)
    got = {p.name: file_sha256(p) for p in sorted(dest.iterdir())}
    if pins is not None and pins and got != pins:
        differ = sorted(set(got.items()) ^ set(pins.items()))
        raise HadronError(
            "the tools wheels downloaded differ from buildenv.lock: " + ", ".join(f"{n} {h[:12]}" for n, h in differ),
            hint="PyPI served other files than the lock names; check the network, or run "
            "`hadron buildenv build --update-lock` to adopt the new ones",
        )
    return got


def _requirement_of(wheel: str) -> str:
    name, version = wheel.split("-")[:2]
    return f"{name}=={version}"


def make(layout: CacheLayout, epoch: int, *, pins: EnvLock | None = None,
         log: Callable[[str], None] = lambda _m: None) -> tuple[BuildEnv, bool]:
    """Build the environment (from the table's packages, the lock's wheels if ``pins``); returns it
    and whether it was new to this cache."""
    packages = build_env_packages()
    sources = debian_binary_sources(SUITE)
    if not sources:
        raise HadronError(f"this host's apt configuration has no Debian {SUITE} sources signed by Debian's archive key",
                          hint="mmdebstrap builds the environment from the host's apt sources (/etc/apt)")
    with layout.work_dir("buildenv") as work:
        log("downloading the tools venv's wheels")
        wheels = _download_wheels(work / "wheels", pins.wheels if pins else None)
        pip_wheel = next((w for w in wheels if w.startswith("pip-")), None)
        if pip_wheel is None:
            raise HadronError("no pip wheel among the build environment's wheels",
                              hint="buildenv.lock's wheels must include pip; run `hadron buildenv build --update-lock`")
        tools = [w for w in sorted(wheels) if not w.startswith("pip-")]
        tree = work / "env" / "rootfs"
        tree.parent.mkdir()
        hooks = [
            f'copy-in {work / "wheels"} /tmp',
            f'chroot "$1" python3 -m venv --without-pip {TOOLS_VENV}',
            f'chroot "$1" {TOOLS_VENV}/bin/python3 /tmp/wheels/{pip_wheel}/pip install --quiet --no-index '
            f'--no-compile --no-cache-dir --disable-pip-version-check {" ".join("/tmp/wheels/" + w for w in tools)}',
            'rm -rf "$1"/tmp/wheels',
        ]
        argv: list[str] = []
        if os.geteuid() == 0:
            # A private mount namespace, so that nothing mmdebstrap mounts outlives it. `unshare
            # --propagation private` fails where / is not a mount point (a chroot): make / private
            # from inside instead, where that is possible.
            argv += ["unshare", "--mount", "--propagation", "unchanged", "--", "/bin/sh", "-c",
                     'mount --make-rprivate / 2>/dev/null; exec "$@"', "mmdebstrap", "mmdebstrap", "--mode=root"]
        else:
            argv += ["mmdebstrap", "--mode=unshare"]
        argv += ["--quiet", "--variant=minbase", "--format=directory", "--include=" + ",".join(packages)]
        argv += [f"--customize-hook={h}" for h in hooks]
        argv += [SUITE, str(tree), "-"]
        log(f"mmdebstrap: Debian {SUITE} minbase + {len(packages)} packages")
        runner.run(argv, what="mmdebstrap (build environment)", input=sources,
                   env={"SOURCE_DATE_EPOCH": str(epoch)}, timeout=MMDEBSTRAP_TIMEOUT)
        _tidy(tree)
        installed = installed_packages(tree)
        desc = tree / DESCRIPTION
        desc.parent.mkdir(parents=True, exist_ok=True)
        desc.write_text(json.dumps({"suite": SUITE, "source_date_epoch": epoch, "packages": packages,
                                    "wheels": wheels, "installed": installed}, indent=1, sort_keys=True) + "\n")
        log("writing the OCI image")
        summary = oci.write_layout(tree, work / "env" / "oci", tag=TAG, epoch=epoch,
                                   labels={"org.opencontainers.image.title": "hadron build environment",
                                           "org.opencontainers.image.base.name": f"debian:{SUITE}"})
        digest = str(summary["manifest"])
        (work / "env" / "env.json").write_text(json.dumps({"digest": digest, "made_here": True,
                                                           "size": summary["uncompressed_size"]}, indent=1))
        return _publish(layout, digest, work / "env")


def _tidy(tree: Path) -> None:
    """What the sandbox provides itself (device nodes) and apt's download leftovers go; the
    sandbox's mount points are made."""
    for d in ("dev", "var/cache/apt/archives", "var/lib/apt/lists", "tmp"):
        p = tree / d
        if p.is_dir():
            for entry in p.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    remove_tree(entry)
                else:
                    entry.unlink()
    # What mmdebstrap copies from the machine that runs it (its hostname, resolver and apt sources)
    # would make the digest depend on that machine: the sandbox provides none of them.
    for f in ("var/cache/apt/pkgcache.bin", "var/cache/apt/srcpkgcache.bin", "etc/hostname", "etc/resolv.conf",
              "etc/apt/sources.list"):
        (tree / f).unlink(missing_ok=True)
    for listing in (tree / "etc/apt/sources.list.d").glob("*"):
        listing.unlink()
    for m in MOUNT_POINTS:
        (tree / m).mkdir(exist_ok=True)


def _publish(layout: CacheLayout, digest: str, staged: Path) -> tuple[BuildEnv, bool]:
    final = layout.buildenv(digest.removeprefix("sha256:"))
    final.parent.mkdir(parents=True, exist_ok=True)
    if find(layout, digest) is not None:
        return BuildEnv(digest, final), False
    if final.exists():  # an incomplete entry (no env.json): replace it
        remove_tree(final)
    os.rename(staged, final)
    return BuildEnv(digest, final), True


def write_lock(project: Path, env: BuildEnv) -> Path:
    path = lock_path(project)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(env.lock().to_json())
    os.replace(tmp, path)
    return path


def differences(lock: EnvLock, env: BuildEnv) -> list[str]:
    """What differs between the lock and an environment: packages and wheels."""
    other = env.lock()
    out = []
    have = other.installed
    for name in sorted(set(lock.installed) | set(have)):
        a, b = lock.installed.get(name), have.get(name)
        if a != b:
            out.append(f"{name} {a or '(absent)'} -> {b or '(absent)'}")
    for wheel, sha in sorted(set(lock.wheels.items()) ^ set(other.wheels.items())):
        out.append(f"wheel {wheel} {sha[:12]} {'only in the lock' if lock.wheels.get(wheel) == sha else 'new'}")
    if lock.epoch != other.epoch:
        out.append(f"source_date_epoch {lock.epoch} -> {other.epoch}")
    return out


def _ref(remote: str, digest: str | None = None) -> str:
    base = remote if "://" in remote else f"docker://{remote}"
    return f"{base}@{digest}" if digest else f"{base}:{TAG}"


def push(env: BuildEnv, remote: str, *, tls_verify: bool = True) -> str:
    """Push the environment's image to ``remote`` (a repository); returns the reference by digest."""
    with _digestfile(env.path.parent) as df:
        runner.run(["skopeo", "copy", "--quiet", f"--dest-tls-verify={str(tls_verify).lower()}",
                    "--digestfile", str(df), f"oci:{env.oci}:{TAG}", _ref(remote)],
                   what="skopeo copy (push build environment)")
        pushed = df.read_text().strip()
    if pushed != env.digest:
        raise HadronError(f"the registry stored the build environment as {pushed}, not {env.digest}",
                          hint=f"the registry at {remote} rewrote the manifest; use one that keeps OCI manifests")
    return f"{remote}@{env.digest}"


class _digestfile:
    def __init__(self, parent: Path) -> None:
        self.path = parent / f".digest.{os.getpid()}"

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *_exc: object) -> None:
        self.path.unlink(missing_ok=True)


def pull(layout: CacheLayout, remote: str, digest: str, *, tls_verify: bool = True) -> BuildEnv:
    """The environment ``digest`` from the cache, else from ``remote`` (by digest: skopeo checks it,
    and the unpacked tree comes from the layer the manifest names)."""
    hit = find(layout, digest)
    if hit is not None:
        return hit
    with layout.work_dir("buildenv-pull") as work:
        staged = work / "env"
        staged.mkdir()
        runner.run(["skopeo", "copy", "--quiet", f"--src-tls-verify={str(tls_verify).lower()}",
                    _ref(remote, digest), f"oci:{staged / 'oci'}:{TAG}"], what="skopeo copy (pull build environment)")
        index = json.loads((staged / "oci" / "index.json").read_text())
        got = index["manifests"][0]["digest"]
        if got != digest:
            raise HadronError(f"{remote} served {got} for build environment {digest}")
        manifest = json.loads((staged / "oci" / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())
        if len(manifest["layers"]) != 1:
            raise HadronError(f"{remote}@{digest}: a build environment has one layer, "
                              f"this one has {len(manifest['layers'])}")
        layer = staged / "oci" / "blobs" / "sha256" / manifest["layers"][0]["digest"].removeprefix("sha256:")
        (staged / "rootfs").mkdir()
        runner.run(["tar", "-xzf", str(layer), "-C", str(staged / "rootfs"), "--numeric-owner",
                    "--same-permissions"], what="tar (unpack build environment)")
        if not (staged / "rootfs" / DESCRIPTION).is_file():
            raise HadronError(f"{remote}@{digest} is not a Hadron build environment (no /{DESCRIPTION})")
        (staged / "env.json").write_text(json.dumps({"digest": digest, "pulled_from": remote}, indent=1))
        env, _new = _publish(layout, digest, staged)
        return env


def ensure(layout: CacheLayout, project: Path, *, remote: str | None, tls_verify: bool = True,
           locked: bool = False, warn: Callable[[str], None] = lambda _m: None,
           log: Callable[[str], None] = lambda _m: None) -> BuildEnv | None:
    """The project's build environment (None for a project without ``buildenv.lock``): from the
    cache, else pulled from ``remote`` by the lock's digest, else built here."""
    lock = read_lock(project)
    if lock is None:
        return None
    hit = find(layout, lock.digest)
    if hit is not None:
        return hit
    if remote:
        try:
            return pull(layout, remote, lock.digest, tls_verify=tls_verify)
        except HadronError as e:
            warn(f"could not pull build environment {lock.digest} from {remote} ({e.message}); building it here")
    log(f"building the build environment (buildenv.lock names {lock.digest})")
    env, _new = make(layout, lock.epoch, pins=lock, log=log)
    if env.digest == lock.digest:
        return env
    diff = differences(lock, env)
    shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
    message = (f"the build environment built here is {env.digest}, not {lock.digest} as buildenv.lock says "
               f"({shown or 'same packages: the trees differ'})")
    if locked:
        raise HadronError(message, hint="pull the locked environment from a registry ([buildenv] remote in "
                          "hadron.toml), or adopt this one with `hadron buildenv build --update-lock`")
    warn(message + "; building with it: cache keys will differ from the lock's")
    return env


def prune(layout: CacheLayout, keep: set[str]) -> tuple[int, int]:
    """Remove the environments whose digest is not in ``keep``; returns (count, bytes freed)."""
    from hadron.layout import tree_size

    count = freed = 0
    if layout.buildenvs.is_dir():
        for p in sorted(layout.buildenvs.iterdir()):
            if f"sha256:{p.name}" in keep:
                continue
            freed += tree_size(p)
            remove_tree(p)
            count += 1
    return count, freed
