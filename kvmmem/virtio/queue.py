"""Split virtqueues (VIRTIO 1.2, section 2.7), device side.

The driver owns three areas of guest memory: the descriptor table, the
available ring (heads of chains offered to the device) and the used ring
(heads the device has finished with, plus how much it wrote).  Everything in
them is guest-controlled, so every value read is checked before it is used,
and a bad one raises :class:`QueueViolation`; the transport answers that
with DEVICE_NEEDS_RESET.  Guest memory is only reached through
:class:`~kvmmem.memory.guest_memory.GuestMemory`, so a bad address can never
reach host memory outside the guest.

Not offered, hence not implemented: VIRTIO_F_INDIRECT_DESC (a descriptor
with the INDIRECT flag is a violation) and VIRTIO_F_EVENT_IDX.  The
driver's VIRTQ_AVAIL_F_NO_INTERRUPT hint is ignored (allowed: a device
"SHOULD NOT" interrupt then), so every batch of used buffers interrupts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmmem.memory.guest_memory import GuestMemory, GuestMemoryError

__all__ = [
    "Buffer", "DescriptorChain", "QueueViolation", "SplitQueue", "MAX_QUEUE_SIZE",
    "MAX_CHAIN_BYTES", "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
    "ring_layout",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

MAX_QUEUE_SIZE = 32768
"""Largest split ring size the specification allows."""

MAX_CHAIN_BYTES = 1 << 20
"""Default cap on the readable plus writable bytes of one chain."""

DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

_DESC = struct.Struct("<QIHH")          # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")       # id, len


class QueueViolation(ValueError):
    """The driver put something into a virtqueue that breaks the protocol."""


def ring_layout(size: int) -> tuple[int, int, int]:
    """Byte sizes of (descriptor table, available ring, used ring) for ``size``
    entries, including the event-index fields the driver must reserve."""
    return 16 * size, 6 + 2 * size, 6 + 8 * size


@dataclass(frozen=True, slots=True)
class Buffer:
    """One guest buffer of a chain (already checked to be guest RAM)."""

    addr: int
    length: int


@dataclass(frozen=True, slots=True)
class DescriptorChain:
    """A chain popped from the available ring: readable buffers first, then
    writable ones, as the specification orders them."""

    head: int
    readable: tuple[Buffer, ...]
    writable: tuple[Buffer, ...]

    @property
    def readable_length(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(b.length for b in self.writable)


class SplitQueue:
    """The device's view of one ready split virtqueue.

    ``next_avail`` and ``next_used`` are the device's free-running 16-bit ring
    positions (0 after a queue is enabled; other values restore a saved
    queue).  Construction checks size, alignment and that all three areas are
    guest RAM (the used ring writable).
    """

    def __init__(self, memory: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, max_size: int = MAX_QUEUE_SIZE,
                 max_chain_bytes: int = MAX_CHAIN_BYTES, next_avail: int = 0,
                 next_used: int = 0) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"max_size {max_size} must be a power of two in 1..{MAX_QUEUE_SIZE}")
        if not 0 < size <= max_size or size & (size - 1):
            raise QueueViolation(f"queue size {size} is not a power of two in 1..{max_size}")
        for what, addr, align in (("descriptor table", desc_addr, DESC_ALIGN),
                                  ("available ring", avail_addr, AVAIL_ALIGN),
                                  ("used ring", used_addr, USED_ALIGN)):
            if addr % align:
                raise QueueViolation(f"{what} address {addr:#x} is not {align}-byte aligned")
        desc_len, avail_len, used_len = ring_layout(size)
        try:
            memory.check(desc_addr, desc_len)
            memory.check(avail_addr, avail_len)
            memory.check(used_addr, used_len, write=True)
        except GuestMemoryError as exc:
            raise QueueViolation(f"virtqueue area outside guest RAM: {exc}") from exc
        self.memory = memory
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, avail_addr, used_addr
        self.max_chain_bytes = max_chain_bytes
        self.next_avail = next_avail & 0xFFFF
        self.next_used = next_used & 0xFFFF

    def __repr__(self) -> str:
        return (f"<SplitQueue size={self.size} desc={self.desc_addr:#x} "
                f"avail={self.avail_addr:#x} used={self.used_addr:#x} "
                f"next_avail={self.next_avail} next_used={self.next_used}>")

    # -- available ring -----------------------------------------------------------

    def pending(self) -> int:
        """How many chains the driver has made available and the device not taken."""
        avail_idx = self._u16(self.avail_addr + 2)
        count = (avail_idx - self.next_avail) & 0xFFFF
        if count > self.size:
            raise QueueViolation(f"available index {avail_idx} is {count} ahead of the "
                                 f"device's {self.next_avail}, more than the queue size "
                                 f"{self.size}")
        return count

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, walked and checked; None when empty."""
        if not self.pending():
            return None
        slot = self.next_avail & (self.size - 1)
        head = self._u16(self.avail_addr + 4 + 2 * slot)
        chain = self._walk(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise QueueViolation(f"available ring names descriptor {head}, beyond the "
                                 f"queue size {size}")
        readable: list[Buffer] = []
        writable: list[Buffer] = []
        total = 0
        index = head
        for _ in range(size):
            addr, length, flags, nxt = _DESC.unpack(self._read(self.desc_addr + 16 * index, 16))
            where = f"descriptor {index} of chain {head}"
            if flags & VIRTQ_DESC_F_INDIRECT:
                raise QueueViolation(f"{where} is INDIRECT, a feature not offered")
            total += length
            if total > self.max_chain_bytes:
                raise QueueViolation(f"chain {head} is longer than {self.max_chain_bytes} bytes")
            is_write = bool(flags & VIRTQ_DESC_F_WRITE)
            if not is_write and writable:
                raise QueueViolation(f"{where} is device-readable but follows a "
                                     "device-writable one")
            try:
                self.memory.check(addr, length, write=is_write)
            except GuestMemoryError as exc:
                raise QueueViolation(f"{where}: buffer outside guest RAM: {exc}") from exc
            (writable if is_write else readable).append(Buffer(addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable))
            if nxt >= size:
                raise QueueViolation(f"{where} continues at {nxt}, beyond the queue size {size}")
            index = nxt
        raise QueueViolation(f"chain {head} has more than {size} descriptors (a loop)")

    # -- buffers ------------------------------------------------------------------

    def read_request(self, chain: DescriptorChain) -> bytes:
        """The concatenated device-readable buffers of ``chain``."""
        return b"".join(self._read(b.addr, b.length) for b in chain.readable)

    def write_response(self, chain: DescriptorChain, data: bytes) -> int:
        """Scatter ``data`` over the writable buffers of ``chain``; returns its length."""
        if len(data) > chain.writable_length:
            raise ValueError(f"response of {len(data)} bytes exceeds the "
                             f"{chain.writable_length} writable bytes of chain {chain.head}")
        done = 0
        for b in chain.writable:
            if done >= len(data):
                break
            part = data[done:done + b.length]
            self._write(b.addr, part)
            done += len(part)
        return done

    # -- used ring -------------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes filled in."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor of a queue of size {self.size}")
        slot = self.next_used & (self.size - 1)
        self._write(self.used_addr + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.next_used = (self.next_used + 1) & 0xFFFF
        # The element must be visible before the index: x86 keeps store order.
        self._write(self.used_addr + 2, _U16.pack(self.next_used))

    # -- guest memory, with memory errors as violations ----------------------------

    def _u16(self, gpa: int) -> int:
        value: int = _U16.unpack(self._read(gpa, 2))[0]
        return value

    def _read(self, gpa: int, size: int) -> bytes:
        try:
            return self.memory.read(gpa, size)
        except GuestMemoryError as exc:
            raise QueueViolation(str(exc)) from exc

    def _write(self, gpa: int, data: bytes) -> None:
        try:
            self.memory.write(gpa, data)
        except GuestMemoryError as exc:
            raise QueueViolation(str(exc)) from exc
