"""Shared plumbing of the three KVM file-descriptor classes."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Self

from kvmmem.kvm._lib import ffi, lib
from kvmmem.kvm.error import KvmError


class FdObject:
    """Owns one file descriptor and issues ioctls on it.

    Every ioctl is counted by name in ``ioctl_counts`` (tests and benchmarks
    read it) and a failure becomes a :class:`KvmError` naming the ioctl.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.ioctl_counts: Counter[str] = Counter()

    @property
    def fd(self) -> int:
        """The file descriptor, or -1 once closed."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _ioctl_ptr(self, name: str, request: int, arg: Any) -> int:
        self.ioctl_counts[name] += 1
        ret: int = lib.kvmmem_ioctl_ptr(self._fd, request, arg)
        if ret < 0:
            raise KvmError(ffi.errno, name, self._closed_detail())
        return ret

    def _ioctl_int(self, name: str, request: int, arg: int = 0) -> int:
        self.ioctl_counts[name] += 1
        ret: int = lib.kvmmem_ioctl_int(self._fd, request, arg)
        if ret < 0:
            raise KvmError(ffi.errno, name, self._closed_detail())
        return ret

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP (VM and vCPU fds both take it): turn on ``cap``
        with up to four arguments."""
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap, ec.flags = cap, flags
        for i, value in enumerate(args):
            ec.args[i] = value
        self._ioctl_ptr("KVM_ENABLE_CAP", lib.KVM_ENABLE_CAP, ec)

    def _closed_detail(self) -> str | None:
        return "the file descriptor is closed" if self._fd < 0 else None

    def close(self) -> None:
        """Close the file descriptor; further ioctls fail with EBADF."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
