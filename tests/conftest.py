from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services import Registry
from synth import http_server, make_tarball, write_package


@dataclass
class Project:
    root: Path
    cache: Path
    url: str
    hits: list[str]
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def packages(self) -> Path:
        return self.root / "distro" / "packages"

    @property
    def dist(self) -> Path:
        return self.root / "dist"

    def add(self, name: str, style: str, deps: list[str] | None = None, **kw: object) -> str:
        d = write_package(self.packages, self.dist, self.url, name, style, deps or [], **kw)  # type: ignore[arg-type]
        self.digests[name] = d
        return d

    def hadron(self, *args: str, check: bool = False, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, HADRON_CACHE=str(self.cache), HADRON_MIRRORS="")
        env.pop("HADRON_CONFIG", None)
        res = subprocess.run(
            [sys.executable, "-m", "hadron", *args], cwd=self.root, env=env, text=True,
            capture_output=True, timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"hadron {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def popen(self, *args: str) -> subprocess.Popen[str]:
        env = dict(os.environ, HADRON_CACHE=str(self.cache), HADRON_MIRRORS="")
        return subprocess.Popen(
            [sys.executable, "-m", "hadron", *args], cwd=self.root, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )


HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello from hadron"); return 0; }\n'


def add_static_hello(p: Project, name: str = "hello", setuid: bool = False) -> None:
    digest = make_tarball(p.dist / f"{name}-1.tar.gz", f"{name}-1", {"hello.c": HELLO_C})
    install = (
        'install -Dm755 hello "$DESTDIR/usr/bin/hello"\nmkdir -p "$DESTDIR/bin"\n'
        'ln -s ../usr/bin/hello "$DESTDIR/bin/hi"'
    )
    if setuid:
        install += '\nchmod 4755 "$DESTDIR/usr/bin/hello"'
    (p.packages / f"{name}.toml").write_text(
        f'name = "{name}"\nversion = "1"\nsummary = "static hello"\nlicense = "MIT"\n'
        f'homepage = "https://example.org"\n[[sources]]\nurl = "{p.url}/{name}-1.tar.gz"\nsha256 = "{digest}"\n'
        'unsigned = "a test file: no upstream signature"\n'
        f'[build]\nsystem = "custom"\nbuild = "cc -O2 -g -static -o hello /src/hello.c"\n'
        f"install = '''\n{install}\n'''\n[depends]\ntoolchain = false\n"
    )


def add_image(p: Project, name: str, packages: list[str], extra: str = "") -> None:
    images = p.root / "distro" / "images"
    images.mkdir(parents=True, exist_ok=True)
    pk = ", ".join(f'"{x}"' for x in packages)
    (images / f"{name}.toml").write_text(
        f'name = "{name}"\nsummary = "test image"\nversion = "0.1"\npackages = [{pk}]\n'
        f'cmd = ["/usr/bin/hello"]\n{extra}'
    )


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Project]:
    root = tmp_path / "proj"
    (root / "distro" / "packages").mkdir(parents=True)
    (root / "dist").mkdir()
    with http_server(root / "dist") as (url, hits):
        yield Project(root=root, cache=tmp_path / "cache", url=url, hits=hits)


@pytest.fixture
def mini(project: Project) -> Project:
    add_static_hello(project)
    add_image(project, "mini", ["hello"])
    return project


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(tmp_path / "registry")
    reg.start()
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture
def registry(registry_server: Registry) -> str:
    return registry_server.address
