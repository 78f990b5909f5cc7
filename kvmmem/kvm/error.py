"""The single error type of the KVM layer."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed, or was refused before it was
    issued because KVM would have refused it.

    Carries the errno and the ioctl's name, so callers can tell an
    overlapping memslot (EEXIST) from an exhausted slot table (ENOSPC).
    """

    def __init__(self, errno: int, ioctl: str, detail: str | None = None) -> None:
        message = f"{ioctl}: {os.strerror(errno)}"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(errno, message)
        self.ioctl = ioctl
        self.detail = detail

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno if self.errno is not None else -1, str(self.errno))
        return f"[{name}] {self.strerror}"


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` is missing, not accessible, or speaks another API version."""
