"""Services tests and benchmarks start on loopback: a docker-registry and Docker daemons with their
own data roots and sockets. Each is stopped by its own pid."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DOCKERD = "/usr/sbin/dockerd"
DOCKER = "/usr/bin/docker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Registry:
    """A docker-registry on 127.0.0.1 with its storage under ``root``; stopped by its own pid."""

    root: Path
    port: int = field(default_factory=lambda: free_port())
    proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("docker-registry")
        if exe is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        cfg = self.root / "registry.yml"
        self.root.mkdir(parents=True, exist_ok=True)
        cfg.write_text(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: " + str(self.root / "storage") + "\n"
            f"http:\n  addr: {self.address}\nlog:\n  level: error\n"
        )
        self.proc = subprocess.Popen([exe, "serve", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"docker-registry did not listen on {self.address}")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


@dataclass
class Daemon:
    name: str
    root: Path
    exec_root: Path
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        return f"unix://{self.root / 'docker.sock'}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root / "data", ignore_errors=True)
        shutil.rmtree(self.exec_root, ignore_errors=True)


def start_dockerd(base: Path, name: str) -> Daemon:
    for exe in (DOCKERD, DOCKER):
        if not Path(exe).exists():
            raise RuntimeError(f"{exe} is missing (apt-get install docker.io)")
    root = base / f"dockerd-{name}"
    root.mkdir(parents=True)
    exec_root = Path(f"/run/hadron-test-{os.getpid()}-{name}")
    log = (root / "dockerd.log").open("wb")
    proc = subprocess.Popen(
        [DOCKERD, "--data-root", str(root / "data"), "--exec-root", str(exec_root),
         "-H", f"unix://{root / 'docker.sock'}", "--pidfile", str(root / "dockerd.pid"),
         "--iptables=false", "--ip-masq=false", "--bridge=none", "--storage-driver=overlay2",
         "--containerd-namespace", f"hadron-test-{name}", "--containerd-plugins-namespace",
         f"hadron-test-{name}-plugins"], stdout=log, stderr=subprocess.STDOUT)
    d = Daemon(name, root, exec_root, proc)
    for _ in range(120):
        if subprocess.run([DOCKER, "-H", d.address, "version"], capture_output=True).returncode == 0:
            return d
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    d.stop()
    raise RuntimeError(f"dockerd {name} did not start: {(root / 'dockerd.log').read_text()[-2000:]}")
