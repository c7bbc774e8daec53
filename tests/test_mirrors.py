from __future__ import annotations

from pathlib import Path

import pytest

from hadron.engine.mirrors import DebianProvider, apt_debian_uris, debian_binary_sources, make_providers, pool_prefix
from hadron.engine.recipe import MirrorAlternative, Source
from hadron.errors import HadronError

SHA = "a" * 64


def test_pool_prefix() -> None:
    assert pool_prefix("musl") == "m"
    assert pool_prefix("libcap2") == "libc"
    assert pool_prefix("libzstd") == "libz"
    assert pool_prefix("lib") == "l"


def test_apt_configuration_deb822_and_one_line(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://disabled.invalid/debian\nSuites: trixie\nComponents: main\nEnabled: no\n"
    )
    (d / "other.list").write_text("deb [arch=amd64] https://third.invalid/apt stable main\n")
    (tmp_path / "sources.list").write_text("# comment\ndeb http://old.invalid/debian/ bookworm main contrib\n")
    assert apt_debian_uris(tmp_path) == ["http://old.invalid/debian", "http://mirror.invalid/debian"]


def test_debian_binary_sources_for_mmdebstrap(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    key = "/usr/share/keyrings/debian-archive-keyring.gpg"
    (d / "debian.sources").write_text(
        f"Types: deb deb-src\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates trixie\n"
        f"Components: main contrib\nSigned-By: {key}\n\n"
        "Types: deb\nURIs: http://vendor.invalid/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/vendor.gpg\n\n"
        "Types: deb-src\nURIs: http://src.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb\nURIs: http://inline.invalid/debian\nSuites: bookworm\nComponents: main\n"
        "Signed-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n -----END PGP PUBLIC KEY BLOCK-----\n"
    )
    (tmp_path / "sources.list").write_text(
        f"deb [signed-by={key}] http://sec.invalid/debian-security bookworm-security main\n"
        "deb http://old.invalid/debian bullseye main\n")
    assert debian_binary_sources("bookworm", tmp_path) == (
        f"Types: deb\nURIs: http://sec.invalid/debian-security\nSuites: bookworm-security\nComponents: main\n"
        f"Signed-By: {key}\n\n"
        f"Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\n"
        f"Components: main contrib\nSigned-By: {key}\n")
    assert debian_binary_sources("sid", tmp_path) == ""


def test_debian_candidates_use_pool_path_and_digests() -> None:
    src = Source(
        url="https://example.org/x-1.tar.gz",
        sha256=SHA,
        unsigned="a test source: no upstream signature",
        alternatives=[
            MirrorAlternative(provider="debian", package="libfoo", file="libfoo_1.orig.tar.gz"),
            MirrorAlternative(provider="debian", package="libfoo", file="libfoo_1+dfsg.orig.tar.xz",
                              sha256="b" * 64, note="repack"),
        ],
    )
    c = DebianProvider(["http://m.invalid/debian"]).candidates(src)
    assert [(x.url, x.sha256) for x in c] == [
        ("http://m.invalid/debian/pool/main/libf/libfoo/libfoo_1.orig.tar.gz", SHA),
        ("http://m.invalid/debian/pool/main/libf/libfoo/libfoo_1+dfsg.orig.tar.xz", "b" * 64),
    ]


def test_unknown_mirror_spec() -> None:
    with pytest.raises(HadronError, match="unknown mirror"):
        make_providers(["ftp.example.org"])


def test_host_apt_configuration_names_a_debian_archive() -> None:
    if not Path("/etc/apt").is_dir():
        pytest.skip("no apt configuration on this host")
    uris = apt_debian_uris()
    assert uris and all(u.endswith("debian") for u in uris)
