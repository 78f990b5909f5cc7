"""What the QMP server lets its clients cost: how many may connect, how much
unread output they may leave in the process, and a log that a flood of
failures cannot fill.

A client beyond the limit, or one the process has no file descriptor left
for, is accepted and closed at once after one error line, so it learns why
and the listen backlog never stays full (a full backlog would leave the
listening socket readable and the server spinning on it).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

from kvmmem.vmm.qmp_protocol import ErrorClass, encode_message

MAX_CLIENTS = 100
"""Clients connected at once; more are refused (QEMU's chardev takes one)."""
MAX_OUTPUT = 32 << 20
"""Bytes of replies and events all clients together may leave unread; past
it the client holding most is disconnected."""
SUSPEND_AT = 64 << 10
"""A client with this much unread is not answered until it reads."""
LOG_INTERVAL = 5.0
"""Seconds between two lines of the same repeated warning."""
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class RateLimitedLog:
    """One warning per ``interval`` seconds at most; the lines it held back
    are counted in the next one it lets through."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += f" (and {self._held} more like it in the last {self.interval:g} s)"
        self.logger.warning(message, *args)
        self._next, self._held = now + self.interval, 0


def refuse(sock: socket.socket, desc: str) -> None:
    """Tell a client why it is not served (one error line instead of the
    greeting, if its socket takes it now) and close its connection."""
    try:
        sock.setblocking(False)
        sock.send(encode_message({"error": {"class": str(ErrorClass.GENERIC), "desc": desc}}),
                  socket.MSG_NOSIGNAL)
    except OSError:
        pass
    finally:
        sock.close()


class SpareFd:
    """A file descriptor kept in reserve, so that a server out of file
    descriptors can still accept one connection (to refuse it) and so take
    it out of the listen backlog."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.take()

    def take(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None           # tried again at the next refusal

    def release(self) -> bool:
        """Give the spare back to the process; whether there was one."""
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        return True

    def close(self) -> None:
        self.release()
