from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hadron.engine.fetch import SourceStore, fetch_source
from hadron.engine.mirrors import TemplateProvider
from hadron.engine.recipe import Source
from hadron.errors import FetchError
from hadron.layout import CacheLayout
from synth import http_server

UNSIGNED = "a test file: no upstream signature"


def serve(tmp_path: Path, name: str, data: bytes) -> str:
    d = tmp_path / "www"
    d.mkdir(exist_ok=True)
    (d / name).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def store_files(store: SourceStore) -> list[str]:
    files = list(store.objects.iterdir()) if store.objects.exists() else []
    tmp = list(store.tmp.iterdir()) if store.tmp.exists() else []
    return sorted(p.name for p in files + tmp)


def test_fetch_verifies_and_never_downloads_twice(tmp_path: Path) -> None:
    digest = serve(tmp_path, "a.tar.gz", b"hello")
    store = SourceStore(CacheLayout(tmp_path / "store"))
    with http_server(tmp_path / "www") as (url, hits):
        src = Source(url=f"{url}/a.tar.gz", sha256=digest, unsigned=UNSIGNED)
        f = fetch_source(store, src, [])
        assert f.path.read_bytes() == b"hello" and f.origin.endswith("/a.tar.gz")
        again = fetch_source(store, src, [])
        assert again.origin == "store" and hits == ["/a.tar.gz"]
    assert store_files(store) == [digest]


def test_mismatch_reports_both_digests_and_leaves_nothing(tmp_path: Path) -> None:
    serve(tmp_path, "a.tar.gz", b"tampered")
    store = SourceStore(CacheLayout(tmp_path / "store"))
    want = hashlib.sha256(b"original").hexdigest()
    with http_server(tmp_path / "www") as (url, _hits), pytest.raises(FetchError) as ei:
        fetch_source(store, Source(url=f"{url}/a.tar.gz", sha256=want, unsigned=UNSIGNED), [],
                     where="pkg.toml: sources[0]")
    msg = str(ei.value)
    assert "sha256 mismatch" in msg and want in msg and hashlib.sha256(b"tampered").hexdigest() in msg
    assert msg.startswith("pkg.toml: sources[0]: ")
    assert store_files(store) == []


def test_truncated_download_is_refused(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    store = SourceStore(CacheLayout(tmp_path / "store"))
    with http_server(tmp_path / "www") as (url, _hits), \
            pytest.raises(FetchError, match="truncated download: got 100 of 1000 bytes"):
        fetch_source(store, Source(url=f"{url}/truncated/x.tar.gz", sha256="0" * 64, unsigned=UNSIGNED), [])
    assert store_files(store) == []


def test_mirror_fallback_in_order_judged_by_same_hash(tmp_path: Path) -> None:
    digest = serve(tmp_path, "good.tar.gz", b"payload")
    serve(tmp_path, "evil.tar.gz", b"evil")
    store = SourceStore(CacheLayout(tmp_path / "store"))
    with http_server(tmp_path / "www") as (url, hits):
        src = Source(url="http://127.0.0.1:9/unreachable.tar.gz", sha256=digest, unsigned=UNSIGNED)
        mirrors = [TemplateProvider(f"{url}/missing/{{filename}}"), TemplateProvider(f"{url}/evil.tar.gz?{{sha256}}"),
                   TemplateProvider(f"{url}/good.tar.gz?{{sha256}}")]
        f = fetch_source(store, src, mirrors)
        assert f.digest == digest and "good.tar.gz" in f.origin
        assert [h.split("?")[0] for h in hits] == ["/missing/unreachable.tar.gz", "/evil.tar.gz", "/good.tar.gz"]


def test_offline_uses_store_only(tmp_path: Path) -> None:
    store = SourceStore(CacheLayout(tmp_path / "store"))
    src = Source(url="http://127.0.0.1:9/x.tar.gz", sha256=hashlib.sha256(b"x").hexdigest(), unsigned=UNSIGNED)
    with pytest.raises(FetchError, match="--offline"):
        fetch_source(store, src, [], offline=True)
    p = tmp_path / "x"
    p.write_bytes(b"x")
    store.add_file(p, src.sha256 or "")
    assert fetch_source(store, src, [], offline=True).origin == "store"


def test_store_verify_finds_corruption(tmp_path: Path) -> None:
    store = SourceStore(CacheLayout(tmp_path / "store"))
    p = tmp_path / "x"
    p.write_bytes(b"x")
    d = hashlib.sha256(b"x").hexdigest()
    store.add_file(p, d)
    assert store.verify() == []
    store.path(d).write_bytes(b"y")
    assert store.verify() == [d]
