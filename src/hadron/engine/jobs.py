"""CPU sharing between concurrent builds: one GNU make jobserver for the whole run.

The pipe holds ``jobs - 1`` tokens. Each running package holds one slot (the first runs on the
implicit slot, every further one takes a token), make-driven steps draw extra tokens from the same
pipe through ``MAKEFLAGS``, and ninja-driven steps take what is free when they start as ``-j``.
No more than ``jobs`` compile jobs run at once, and idle tokens flow to whoever needs them.
"""

from __future__ import annotations

import contextlib
import os
import threading


class JobServer:
    def __init__(self, jobs: int) -> None:
        self.jobs = max(1, jobs)
        self._r, self._w = os.pipe()
        os.set_inheritable(self._r, True)
        os.set_inheritable(self._w, True)
        # A second, non-blocking open file description of the read end for our own polling;
        # make keeps blocking reads on the original one.
        self._nb = os.open(f"/proc/self/fd/{self._r}", os.O_RDONLY | os.O_NONBLOCK)
        os.write(self._w, b"+" * (self.jobs - 1))
        self._implicit_free = True
        self._lock = threading.Lock()

    @property
    def fds(self) -> tuple[int, int]:
        return (self._r, self._w)

    def makeflags(self) -> str:
        return f" -j{self.jobs} --jobserver-auth={self._r},{self._w}"

    def grab(self, most: int) -> list[bytes]:
        """Take up to ``most`` free tokens without waiting."""
        got: list[bytes] = []
        while len(got) < most:
            try:
                b = os.read(self._nb, 1)
            except BlockingIOError:
                break
            if not b:
                break
            got.append(b)
        return got

    def release(self, tokens: list[bytes]) -> None:
        if tokens:
            os.write(self._w, b"".join(tokens))

    def acquire_slot(self) -> bytes | None:
        """A slot to run one more package: the implicit one, or a token; None if all are busy."""
        with self._lock:
            if self._implicit_free:
                self._implicit_free = False
                return b""
        got = self.grab(1)
        return got[0] if got else None

    def release_slot(self, slot: bytes) -> None:
        if slot == b"":
            with self._lock:
                self._implicit_free = True
        else:
            self.release([slot])

    def close(self) -> None:
        for fd in (self._nb, self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
