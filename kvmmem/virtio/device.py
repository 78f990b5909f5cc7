"""The interface a virtio transport drives: :class:`VirtioDevice`.

A device knows its features, its configuration space and how to answer one
request; it knows nothing about rings, registers or interrupts.  The
transport (:mod:`kvmmem.virtio.mmio`) walks the virtqueues, hands each
descriptor chain to :meth:`VirtioDevice.handle` as plain bytes and writes the
answer back, so a device never sees a guest address.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = ["VirtioDevice", "NotifierList", "VIRTIO_F_VERSION_1"]

VIRTIO_F_VERSION_1 = 32
"""Feature bit of a non-legacy (VIRTIO 1.x) device; virtio-mmio version 2
offers and requires it."""


class NotifierList(Protocol):
    """Observers of one event (QEMU's ``NotifierList``): the transport
    subscribes, the device notifies."""

    def add(self, observer: Callable[[None], None]) -> Callable[[None], None]: ...

    def remove(self, observer: Callable[[None], None]) -> None: ...

    def __contains__(self, observer: object) -> bool: ...


@runtime_checkable
class VirtioDevice(Protocol):
    """A virtio device as seen by its transport."""

    device_id: int
    """The virtio device type (24 for virtio-mem)."""

    queue_max_sizes: tuple[int, ...]
    """Largest ring size of each virtqueue, one entry per queue (powers of two)."""

    needs_reset: bool
    """Set by the device when the driver broke the protocol (DEVICE_NEEDS_RESET)."""

    @property
    def config_change_notifiers(self) -> NotifierList:
        """Notified by the device, from any thread, after its configuration
        space changed; the transport subscribes when it takes the device and
        leaves when it closes.  The transport takes its own lock in its
        observer, so a device must not notify while holding a lock that its
        :meth:`handle` also takes (notifying from inside ``handle`` is fine)."""
        ...

    def device_features(self) -> int:
        """The 64-bit feature mask the device offers."""
        ...

    def set_driver_features(self, features: int) -> bool:
        """The driver accepts ``features``; False refuses them (no FEATURES_OK)."""
        ...

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of configuration space; ValueError outside it."""
        ...

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to configuration space; ValueError outside it."""
        ...

    def handle(self, queue: int, request: bytes, response_capacity: int) -> bytes | None:
        """Serve one descriptor chain of ``queue``.

        ``request`` is the concatenation of the chain's device-readable
        buffers, ``response_capacity`` the total size of its device-writable
        ones.  Returns at most that many bytes to write back, or None for a
        protocol violation (the device has set :attr:`needs_reset`).
        """
        ...

    def reset(self) -> None:
        """The driver wrote 0 to the status register."""
        ...
