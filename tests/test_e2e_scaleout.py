"""Beyond one machine, on loopback: a local registry, two BuildKit workers (two Docker daemons with
their own data roots and sockets) and separate caches standing for separate machines.

- Machine A builds a synthetic graph and the real toolchain-host, linux-headers, musl and zlib on
  worker A, and pushes the build environment and every signed output to the registry.
- Machine B, an empty cache that trusts A's key, builds the same targets on worker B and compiles
  nothing: it pulls the environment by digest and every output, byte-identical.
- Machine C (A's sources, no remote cache) builds across both workers: both are used, and every
  output equals machine A's single-worker build.
(Refusals of tampered, unsigned and untrusted artifacts, and a registry killed mid-push, are in
tests/test_remote.py.) The daemons and the registry are stopped by their own pids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hadron.engine import buildenv, remote
from hadron.layout import CacheLayout
from services import Daemon, Registry, start_dockerd
from synth import http_server, write_package

ROOT = Path(__file__).resolve().parents[1]
REAL = ["toolchain-host", "linux-headers", "musl", "zlib"]
SYNTH = ["liba", "libb", "appc"]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (dockerd, mmdebstrap)"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    base = tmp_path_factory.mktemp("scaleout")
    reg = Registry(base / "registry")
    reg.start()
    daemons: list[Daemon] = []
    try:
        try:
            daemons = [start_dockerd(base, "a"), start_dockerd(base, "b")]
        except RuntimeError as e:
            pytest.fail(str(e))
        yield {"base": base, "registry": reg.address, "a": daemons[0], "b": daemons[1]}
    finally:
        for d in daemons:
            d.stop()
        reg.stop()


def _project(base: Path, registry: str, *, cache: dict[str, object] | None) -> Path:
    proj = base / "proj"
    if not proj.exists():
        (proj / "distro").mkdir(parents=True)
        for sub in ("packages", "toolchains"):
            (proj / "distro" / sub).symlink_to(ROOT / "distro" / sub)
    lines = ['[build]\ntoolchain = "host"\n',
             f'[build_env]\nremote = "{registry}/hadron/buildenv"\ntls_verify = false\n']
    if cache is not None:
        lines.append(f'[cache]\nremote = "{registry}/hadron/cache"\ntls_verify = false\n'
                     + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cache.items()))
    (proj / "hadron.toml").write_text("\n".join(lines))
    return proj


def _hadron(proj: Path, cache: Path, *args: str) -> dict[str, object]:
    env = dict(os.environ, HADRON_CACHE=str(cache))
    env.pop("HADRON_CONFIG", None)
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "hadron", *args], cwd=proj, env=env, capture_output=True, text=True,
                         timeout=3000)
    if res.returncode != 0:
        pytest.fail(f"hadron {' '.join(args)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    print(f"hadron {' '.join(args[:2])} … in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return json.loads(res.stdout) if "--json" in args else {}


def _digests(doc: dict[str, object]) -> dict[str, str]:
    pkgs = doc["packages"]
    assert isinstance(pkgs, dict)
    return {n: (Path(p["output"]) / "digest").read_text() for n, p in pkgs.items()}


def test_two_workers_a_registry_and_three_caches(world: dict[str, object]) -> None:
    base, registry = Path(str(world["base"])), str(world["registry"])
    da, db = world["a"], world["b"]
    assert isinstance(da, Daemon) and isinstance(db, Daemon)
    secret, public_file = remote.generate_key("worker-a", base / "keys")
    public = public_file.read_text().strip()
    extra = base / "synthetic"
    extra.mkdir()
    (base / "dist-root").mkdir()
    with http_server(base / "dist-root") as (url, hits):
        write_package(extra, base / "dist-root", url, "liba", "make", [])
        write_package(extra, base / "dist-root", url, "libb", "autotools", ["liba"])
        write_package(extra, base / "dist-root", url, "appc", "meson", ["libb", "liba"])
        targets = [*REAL, *SYNTH]

        # Machine A: makes and locks the environment, builds on worker A, pushes everything.
        cache_a = base / "cache-a"
        proj = _project(base, registry, cache={"signing_key": str(secret)})
        env, _new = buildenv.make(CacheLayout(cache_a), 1735689600)
        buildenv.write_lock(proj, env)
        _hadron(proj, cache_a, "buildenv", "push", f"{registry}/hadron/buildenv", "--no-tls-verify")
        a = _hadron(proj, cache_a, "build", *targets, "--recipes", str(extra), "--json",
                    "--executor", f"buildkit={da.address}")
        pkgs_a = a["packages"]
        assert isinstance(pkgs_a, dict)
        assert {n: p["status"] for n, p in pkgs_a.items()} == dict.fromkeys(targets, "built")
        assert {p["remote"] for p in pkgs_a.values()} == {"pushed"}
        workers_a = a["workers"]
        assert isinstance(workers_a, dict) and sorted(workers_a[da.address]) == sorted(targets)
        for n in targets:
            manifest = json.loads((Path(pkgs_a[n]["output"]) / "manifest.json").read_text())
            assert manifest["isolation"].startswith("BuildKit") and manifest["build_env"] == f"buildenv:{env.digest}"

        # Machine B: empty cache, trusts A; compiles nothing, fetches no source.
        cache_b = base / "cache-b"
        _project(base, registry, cache={"trusted_keys": [public]})
        served = len(hits)
        b = _hadron(proj, cache_b, "build", *targets, "--recipes", str(extra), "--json",
                    "--executor", f"buildkit={db.address}")
        pkgs_b = b["packages"]
        assert isinstance(pkgs_b, dict)
        assert {n: p["status"] for n, p in pkgs_b.items()} == dict.fromkeys(targets, "pulled")
        assert b["workers"] == {db.address: []}
        assert len(hits) == served
        assert not (cache_b / "sources" / "sha256").exists() or not any((cache_b / "sources" / "sha256").iterdir())
        assert buildenv.find(CacheLayout(cache_b), env.digest) is not None
        assert _digests(b) == _digests(a)

        # Machine C: A's sources, no remote cache, both workers.
        cache_c = base / "cache-c"
        (cache_c / "buildenv").mkdir(parents=True)
        subprocess.run(["cp", "-al", str(cache_a / "sources"), str(cache_c / "sources")], check=True)
        subprocess.run(["cp", "-al", str(env.path), str(cache_c / "buildenv")], check=True)
        _project(base, registry, cache=None)
        c = _hadron(proj, cache_c, "build", *targets, "--recipes", str(extra), "--json", "-j", "2",
                    "--executor", f"buildkit={da.address},{db.address}")
        pkgs_c = c["packages"]
        assert isinstance(pkgs_c, dict)
        assert {p["status"] for p in pkgs_c.values()} == {"built"}
        workers = c["workers"]
        assert isinstance(workers, dict)
        assert workers[da.address] and workers[db.address], f"both workers should build: {workers}"
        assert sorted(workers[da.address] + workers[db.address]) == sorted(targets)
        assert _digests(c) == _digests(a)
        print(f"across both workers: {workers}", file=sys.stderr)
