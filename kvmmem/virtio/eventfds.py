"""The eventfds that connect one virtio-mmio transport to KVM.

An irqfd turns a write to an eventfd into an edge on a GSI of the in-kernel
irqchip (the transport's interrupt); an ioeventfd turns a guest write to
QueueNotify into a signal on another eventfd, so the vCPU does not exit for
it. Both are registered with the VM here and unregistered on close.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmmem.kvm import Vm

__all__ = ["IrqFd", "NotifyFd"]


class _KvmEventFd:
    """A non-blocking eventfd registered with a VM for as long as it is open."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._register(fd, deassign=False)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def _register(self, fd: int, deassign: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Unregister (if the VM is still open) and close; idempotent."""
        fd, self.fd = self.fd, -1
        if fd < 0:
            return
        try:
            if not self.vm.closed:
                self._register(fd, deassign=True)
        finally:
            os.close(fd)


class IrqFd(_KvmEventFd):
    """An irqfd on ``gsi``: each :meth:`signal` is an edge."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.gsi = gsi
        super().__init__(vm)

    def _register(self, fd: int, deassign: bool) -> None:
        self.vm.irqfd(fd, self.gsi, deassign=deassign)

    def signal(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass            # counter saturated: KVM has a signal pending anyway


class NotifyFd(_KvmEventFd):
    """An ioeventfd KVM signals on 4-byte guest writes to ``addr`` (any value)."""

    def __init__(self, vm: Vm, addr: int) -> None:
        self.addr = addr
        super().__init__(vm)

    def _register(self, fd: int, deassign: bool) -> None:
        self.vm.ioeventfd(fd, self.addr, 4, deassign=deassign)

    def consume(self) -> int:
        """The number of writes since the last call (0: none)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
