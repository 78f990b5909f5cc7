"""virtio-mmio for a device whose queues a vhost-user back-end serves.

The register file, the handshake and the queue set-up are those of
:class:`~kvmmem.virtio.mmio.VirtioMmioTransport`; what differs:

- QueueNotify is a KVM ioeventfd from the start, and its eventfd is the
  back-end's kick fd; the transport never walks the rings itself.
- The transport's irqfd eventfd is the back-end's call fd, so completions
  raise the GSI inside KVM. InterruptStatus therefore reads with bit 0 set
  while the back-end runs (the VMM cannot see the back-end's signals).
- DRIVER_OK starts the back-end (:meth:`VhostUserBlk.start`); a failure, or
  the back-end hanging up later, sets DEVICE_NEEDS_RESET with a log line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.vhost.frontend import VhostUserError
from kvmmem.virtio.mmio import INT_USED_BUFFER, Reg, Status, VirtioMmioTransport

if TYPE_CHECKING:
    from kvmmem.kvm import Vm
    from kvmmem.vhost.vhost_user_blk import VhostUserBlk

__all__ = ["VhostMmioTransport"]

_DRIVER_OK = int(Status.DRIVER_OK)


class VhostMmioTransport(VirtioMmioTransport):
    """virtio-mmio whose queue service is delegated to a vhost-user back-end."""

    device: VhostUserBlk

    def __init__(self, device: VhostUserBlk, guest_memory: GuestMemory, vm: Vm, gsi: int,
                 *, base: int, name: str) -> None:
        super().__init__(device, guest_memory, vm, gsi, base=base, name=name)
        self.attach_ioeventfd()
        device.frontend.on_disconnect.append(self._backend_gone)

    def _process(self, index: int) -> None:
        """The back-end serves the rings: nothing to do (counted: DRIVER_OK comes here,
        and a QueueNotify would if it ever exited instead of signalling the ioeventfd)."""
        self.stats["notify_exits"] += 1

    def _write_status(self, value: int) -> None:
        was_ok = self._status & _DRIVER_OK
        super()._write_status(value)
        if was_ok or not self._status & _DRIVER_OK or self._needs_reset:
            return
        notify, irq = self.notify_fd, self.irq_fd
        assert notify is not None and irq is not None
        try:
            self.device.start(self.queues, notify, irq)
        except VhostUserError as exc:
            self._violation(f"starting the vhost-user back-end failed: {exc}")

    def _read_register(self, reg: Reg) -> int:
        value = super()._read_register(reg)
        if reg is Reg.INTERRUPT_STATUS and self.device.started:
            value |= INT_USED_BUFFER
        return value

    def reconnected(self) -> None:
        """The device has a new connection: follow it (the driver still has to
        reset the device, which shows DEVICE_NEEDS_RESET since the old one went)."""
        self.device.frontend.on_disconnect.append(self._backend_gone)

    def _backend_gone(self, reason: str) -> None:
        with self._lock:
            self._violation(f"vhost-user back-end disconnected: {reason}")
