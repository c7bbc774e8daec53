"""The sandbox: no network, nothing of the host writable, a cleared environment."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from hadron.engine import sandbox
from hadron.engine.sandbox import Mount, Step

pytestmark = pytest.mark.skipif(sandbox.bwrap_path() is None, reason="bubblewrap is not installed")

NET_PROBE = """
import socket, sys
port = int(sys.argv[1])
for host, p in (("127.0.0.1", port), ("1.1.1.1", 80)):
    try:
        socket.create_connection((host, p), timeout=3)
        print("CONNECTED", host)
    except OSError as e:
        print("refused", host, type(e).__name__)
try:
    socket.getaddrinfo("deb.debian.org", 80)
    print("RESOLVED")
except OSError:
    print("no dns")
"""


def run(tmp_path: Path, script: str, mounts: list[Mount] | None = None) -> tuple[int, str]:
    build = tmp_path / "build"
    build.mkdir(exist_ok=True)
    log = tmp_path / "log"
    with log.open("wb") as f:
        rc = sandbox.run(
            Step(["/bin/sh", "-c", script], [Mount(build, "/build", True), *(mounts or [])], sandbox.base_env(42)), f
        )
    return rc, log.read_text()


def test_cannot_reach_the_network(tmp_path: Path) -> None:
    # A server on the host's loopback: reachable from the host, not from the sandbox.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "probe.py").write_text(NET_PROBE)
    rc, out = run(tmp_path, f"/usr/bin/python3 /build/probe.py {port}; echo IFACES; tail -n +3 /proc/net/dev")
    assert rc == 0, out
    assert "CONNECTED" not in out and "RESOLVED" not in out, out
    assert out.count("refused") == 2 and "no dns" in out
    ifaces = [ln.split(":")[0].strip() for ln in out.split("IFACES", 1)[1].splitlines() if ":" in ln]
    assert ifaces == ["lo"]
    # A connection that reached the server would wait in its backlog.
    srv.setblocking(False)
    with pytest.raises(BlockingIOError):
        srv.accept()
    srv.close()


def test_cannot_write_outside_the_sandbox(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("pristine")
    outside = tmp_path / "outside"
    outside.mkdir()
    targets = ["/usr/hadron-x", "/etc/hadron-x", "/hadron-x", "/src/f", "/src/new", "/proc/sys/kernel/hostname",
               str(outside / "x"), "/root/x", "/var/x"]
    script = "\n".join(f"if echo x > {t} 2>/dev/null; then echo WROTE {t}; else echo denied {t}; fi" for t in targets)
    script += "\necho ok > /build/inside && echo tmp > /tmp/t && cat /tmp/t"
    rc, out = run(tmp_path, script, [Mount(src, "/src")])
    assert rc == 0, out
    assert "WROTE" not in out, out
    assert out.count("denied") == len(targets)
    assert (src / "f").read_text() == "pristine" and not (src / "new").exists()
    assert not any(outside.iterdir())
    assert (tmp_path / "build" / "inside").read_text() == "ok\n"
    assert not Path("/hadron-x").exists() and not Path("/usr/hadron-x").exists()


def test_environment_is_cleared_and_fixed(tmp_path: Path) -> None:
    os.environ["HADRON_SECRET_TEST"] = "leak"
    try:
        rc, out = run(tmp_path, "env | sort; umask; hostname; id -u")
    finally:
        del os.environ["HADRON_SECRET_TEST"]
    assert rc == 0
    assert "leak" not in out
    env = dict(ln.split("=", 1) for ln in out.splitlines() if "=" in ln)
    assert env["LC_ALL"] == "C" and env["TZ"] == "UTC" and env["SOURCE_DATE_EPOCH"] == "42"
    # Fixed, not inherited: only the system's own directories, whatever this process's PATH holds.
    system = {"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}
    assert set(env["PATH"].split(":")) <= system
    assert env["HOME"].startswith("/build")
    assert "0022" in out and sandbox.HOSTNAME in out


def test_pid_namespace_hides_host_processes(tmp_path: Path) -> None:
    rc, out = run(tmp_path, "ls /proc | grep -c '^[0-9]'")
    assert rc == 0 and int(out.strip()) < 5


def test_killed_parent_takes_the_sandbox_down(tmp_path: Path) -> None:
    build = tmp_path / "build"
    build.mkdir()
    code = (
        "from pathlib import Path; from hadron import sandbox\n"
        f"b = Path({str(build)!r})\n"
        "sandbox.run(sandbox.Step(['/bin/sh', '-c', 'sleep 2; echo x > /build/alive'],"
        " [sandbox.Mount(b, '/build', True)], sandbox.base_env(0)))\n"
    )
    p = subprocess.Popen(["python3", "-c", code])
    time.sleep(0.8)
    p.kill()
    p.wait()
    time.sleep(2.5)
    assert not (build / "alive").exists()
