"""One way to run a host program: resolved by name, its failure reported with the command and output.

Every host tool Hadron runs directly (strip, mkfs, sfdisk, cpio, zstd, sbsign, skopeo …) goes through
:func:`run`. A program that is not installed is reported with the Debian package that provides it
(from :mod:`hadron.host`'s table); a program that fails is reported with what was being done, the
exit status, the command line and the tail of its output. Long-running programs that stream their
output (QEMU, swtpm, build steps in the sandbox) resolve their path with :func:`tool` and manage the
process themselves.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from hadron import host
from hadron.errors import HadronError

OUTPUT_TAIL = 3000


def tool(name: str) -> str:
    """The path of host program ``name``, or an error naming the package that provides it."""
    exe = shutil.which(name)
    if exe is None:
        raise HadronError(f"{name} is not installed", hint=host.install_hint([name]))
    return exe


def run(
    argv: Sequence[str | Path],
    *,
    what: str | None = None,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: IO[bytes] | None = None,
    stdin: IO[bytes] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run host program ``argv[0]`` (a name from the host table) with the rest as arguments.

    Output is captured as text, unless ``stdout`` is a binary file to write it to; ``stdin`` is a
    binary file to read from (else ``input``, text, or nothing). ``env`` is added
    to this process's environment. Raises HadronError when the program is missing, cannot be
    started, times out or (unless ``check`` is false) exits non-zero."""
    args = [tool(str(argv[0])), *map(str, argv[1:])]
    label = what or str(argv[0])
    full_env = {**os.environ, **env} if env is not None else None
    try:
        if stdout is not None:
            raw = subprocess.run(args, input=input.encode() if input is not None else None, stdout=stdout,
                                 stderr=subprocess.PIPE, env=full_env, cwd=cwd, timeout=timeout)
            res = subprocess.CompletedProcess(args, raw.returncode, "", raw.stderr.decode(errors="replace"))
        elif stdin is not None:
            res = subprocess.run(args, stdin=stdin, capture_output=True, text=True, env=full_env, cwd=cwd,
                                 timeout=timeout)
        else:
            res = subprocess.run(args, input=input, capture_output=True, text=True, env=full_env, cwd=cwd,
                                 timeout=timeout)
    except subprocess.TimeoutExpired:
        raise HadronError(f"{label} did not finish within {timeout:.0f} s",
                          hint=f"command: {shlex.join(args)}") from None
    except OSError as e:
        raise HadronError(f"{label}: cannot run {args[0]}: {e.strerror}") from None
    if res.returncode != 0 and check:
        output = (res.stderr.strip() or res.stdout.strip())[-OUTPUT_TAIL:]
        raise HadronError(f"{label} failed (exit status {res.returncode}):\n{output}",
                          hint=f"command: {shlex.join(args)}")
    return res
