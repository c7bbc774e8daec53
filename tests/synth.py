"""Synthetic upstream packages for tests and benchmarks: tarballs generated on the fly (make-,
autotools- and meson-style hello worlds), served over HTTP on 127.0.0.1, and recipes for them."""

from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MTIME = 1700000000


def make_tarball(dest: Path, top: str, files: dict[str, str], modes: dict[str, int] | None = None) -> str:
    """Write a deterministic .tar.gz of ``files`` under ``top/``; return its sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(files):
            data = files[name].encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            info.mtime = MTIME
            info.mode = (modes or {}).get(name, 0o644)
            tf.addfile(info, io.BytesIO(data))
    import gzip

    raw = gzip.compress(buf.getvalue(), mtime=0)
    dest.write_bytes(raw)
    return hashlib.sha256(raw).hexdigest()


def c_lib(name: str, deps: list[str], work: int = 0) -> dict[str, str]:
    """A tiny C library + program. It includes its dependencies' headers and calls them, so it
    really builds against their outputs. ``work`` adds generated functions to make compiling cost CPU."""
    ident = name.replace("-", "_")
    inc = "".join(f'#include "{d}.h"\n' for d in deps)
    calls = "".join(f"    s += {d.replace('-', '_')}_value();\n" for d in deps)
    extra = ""
    for i in range(work):
        extra += (
            f"int {ident}_w{i}(int x) {{ int r = x; for (int k = 0; k < 100; k++) "
            f"{{ r = r * {i + 3} + k; if (r % 7 == {i % 7}) r ^= k; }} return r; }}\n"
        )
    return {
        f"{name}.h": f"#pragma once\nint {ident}_value(void);\n",
        f"{name}.c": (
            f'{inc}#include "{name}.h"\n{extra}'
            f"int {ident}_value(void) {{\n    int s = 1;\n{calls}    return s;\n}}\n"
        ),
        "main.c": (
            f'#include <stdio.h>\n#include "{name}.h"\n'
            f'int main(void) {{ printf("{name} %d\\n", {ident}_value()); return 0; }}\n'
        ),
    }


def _libs(deps: list[str]) -> str:
    return "-Wl,--start-group " + " ".join(f"-l{d}" for d in deps) + " -Wl,--end-group" if deps else ""


def make_style(name: str, deps: list[str], work: int = 0, units: int = 1,
               link: list[str] | None = None) -> dict[str, str]:
    """``link``: every library to link (a dependency's own dependencies too); default ``deps``."""
    files = c_lib(name, deps, work)
    objs = [f"{name}.o"]
    for u in range(1, units):
        unit = c_lib(f"{name}-u{u}", [], work)
        files[f"u{u}.c"] = unit[f"{name}-u{u}.c"].replace(f'#include "{name}-u{u}.h"\n', "")
        objs.append(f"u{u}.o")
    files["Makefile"] = (
        "PREFIX ?= /usr\nCFLAGS ?= -O2\n"
        "CPPFLAGS += -I$(SYSROOT)/usr/include\nLDFLAGS += -L$(SYSROOT)/usr/lib\n"
        f"all: {name}\n"
        f"lib{name}.a: {' '.join(objs)}\n\t$(AR) rcs $@ $^\n"
        f"{name}: main.o lib{name}.a\n\t$(CC) $(LDFLAGS) -o $@ main.o lib{name}.a {_libs(link or deps)}\n"
        "install: all\n"
        "\tinstall -Dm755 " + name + " $(DESTDIR)$(PREFIX)/bin/" + name + "\n"
        "\tinstall -Dm644 lib" + name + ".a $(DESTDIR)$(PREFIX)/lib/lib" + name + ".a\n"
        "\tinstall -Dm644 " + name + ".h $(DESTDIR)$(PREFIX)/include/" + name + ".h\n"
        "\tinstall -Dm644 README $(DESTDIR)$(PREFIX)/share/doc/" + name + "/README\n"
        "check: all\n\t./" + name + "\n"
    )
    files["README"] = f"{name}\n"
    return files


def autotools_style(name: str, deps: list[str]) -> dict[str, str]:
    """A hand-written ``configure`` in the GNU style: --prefix, --host, VPATH build out of tree."""
    files = c_lib(name, deps)
    files["configure"] = (
        "#!/bin/sh\nset -e\nprefix=/usr/local\n"
        'for a in "$@"; do case "$a" in --prefix=*) prefix="${a#--prefix=}";; --host=*) ;; '
        "--enable-*|--disable-*|--with-*|--without-*) ;; "
        '*) echo "configure: unknown option $a" >&2; exit 1;; esac; done\n'
        'srcdir=$(cd "$(dirname "$0")" && pwd)\n'
        'echo "checking for a C compiler... ${CC:-cc}"\n'
        "cat > Makefile <<EOF\n"
        "srcdir = $srcdir\nprefix = $prefix\nVPATH = $srcdir\nCC ?= cc\n"
        "CPPFLAGS = -I\\$(srcdir) -I$SYSROOT/usr/include\nLDFLAGS = -L$SYSROOT/usr/lib\n"
        f"all: {name}\n"
        f"{name}: main.o {name}.o\n\t\\$(CC) \\$(LDFLAGS) -o \\$@ main.o {name}.o {_libs(deps)}\n"
        f"lib{name}.a: {name}.o\n\t\\$(AR) rcs \\$@ {name}.o\n"
        f"install: all lib{name}.a\n"
        f"\tinstall -Dm755 {name} \\$(DESTDIR)\\$(prefix)/bin/{name}\n"
        f"\tinstall -Dm644 lib{name}.a \\$(DESTDIR)\\$(prefix)/lib/lib{name}.a\n"
        f"\tinstall -Dm644 \\$(srcdir)/{name}.h \\$(DESTDIR)\\$(prefix)/include/{name}.h\n"
        f"\tmkdir -p \\$(DESTDIR)\\$(prefix)/lib/pkgconfig\n"
        f"\tprintf 'prefix=/usr\\\\nName: {name}\\\\nVersion: 1\\\\nDescription: x\\\\nLibs: -l{name}\\\\n' "
        f"> \\$(DESTDIR)\\$(prefix)/lib/pkgconfig/{name}.pc\n"
        "EOF\n"
    )
    return files


def meson_style(name: str, deps: list[str]) -> dict[str, str]:
    files = c_lib(name, deps)
    links = ", ".join(f"cc.find_library('{d}', dirs: '/sysroot/usr/lib')" for d in deps)
    files["meson.build"] = (
        f"project('{name}', 'c', version: '1.0')\ncc = meson.get_compiler('c')\n"
        f"deps = [{links}]\n"
        f"lib = static_library('{name}', '{name}.c', include_directories: include_directories('/sysroot/usr/include'),"
        " install: true)\n"
        f"executable('{name}', 'main.c', link_with: lib, dependencies: deps, install: true)\n"
        f"install_headers('{name}.h')\n"
    )
    return files


STYLES = {"make": make_style, "autotools": autotools_style, "meson": meson_style}


def recipe_toml(name: str, style: str, url: str, sha256: str, deps: list[str], *, version: str = "1.0",
                extra: str = "") -> str:
    build = {
        "make": '[build]\nsystem = "make"\nmake_args = ["SYSROOT=/sysroot"]\n',
        "autotools": '[build]\nsystem = "autotools"\n',
        "meson": '[build]\nsystem = "meson"\n',
    }[style]
    dep_list = ", ".join(f'"{d}"' for d in deps)
    return (
        f'name = "{name}"\nversion = "{version}"\nsummary = "synthetic {style} package"\n'
        f'license = "MIT"\nhomepage = "https://example.org/{name}"\n\n'
        f'[[sources]]\nurl = "{url}"\nsha256 = "{sha256}"\nunsigned = "a test file: no upstream signature"\n\n{build}\n'
        f"[depends]\nbuild = [{dep_list}]\ntoolchain = false\n{extra}"
    )


class _Handler(http.server.SimpleHTTPRequestHandler):
    served: list[str]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        if self.path.startswith("/truncated/"):
            data = b"x" * 100
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextmanager
def http_server(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` on 127.0.0.1; yields (base URL, list of requested paths)."""

    def handler(*a: object, **kw: object) -> _Handler:
        return _Handler(*a, directory=str(root), **kw)  # type: ignore[arg-type]

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
    srv.hits = []  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", srv.hits  # type: ignore[attr-defined]
    finally:
        srv.shutdown()
        srv.server_close()


def write_package(tree: Path, dist: Path, base_url: str, name: str, style: str, deps: list[str],
                  *, version: str = "1.0", work: int = 0, units: int = 1, extra: str = "", marker: str = "",
                  link: list[str] | None = None) -> str:
    """Create the tarball (in ``dist``) and recipe (in ``tree``) of one synthetic package.

    ``link``: every (static) library the program links; they are all build dependencies of the
    recipe, since a sysroot holds build dependencies and their run-time closure only."""
    files = make_style(name, deps, work, units, link) if style == "make" else STYLES[style](name, deps)
    if marker:
        files["MARKER"] = marker
    modes = {"configure": 0o755}
    fname = f"{name}-{version}.tar.gz"
    digest = make_tarball(dist / fname, f"{name}-{version}", files, modes)
    (tree / f"{name}.toml").write_text(
        recipe_toml(name, style, f"{base_url}/{fname}", digest, sorted(set(deps) | set(link or [])), version=version,
                    extra=extra)
    )
    return digest
