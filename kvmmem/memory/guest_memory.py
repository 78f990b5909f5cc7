"""Device access to guest RAM by guest-physical address.

A device must only ever touch memory the guest owns: every access is
resolved against the address space's current flat view and served from the
host memory of RAM ranges only.  Anything else (a hole, an MMIO region, a
write to read-only memory, a protected block of host memory) is refused with
:class:`GuestMemoryError` before a byte is copied.
"""

from __future__ import annotations

from collections.abc import Callable

from kvmmem.memory.address_space import AddressSpace
from kvmmem.memory.flatview import FlatRange, FlatView
from kvmmem.memory.host import HostMemory, HostMemoryError

__all__ = ["GuestMemory", "GuestMemoryError"]

_ADDR_END = 1 << 64


class GuestMemoryError(ValueError):
    """A guest-physical range is not (entirely) guest RAM usable for the access."""


class GuestMemory:
    """Reads and writes of guest RAM through ``address_space``'s flat view.

    The view is fetched on every access, so a commit that unmaps memory takes
    effect at once.  The only cache is the last RAM range hit, kept together
    with the (immutable) view it came from and used only while that view is
    still the current one.
    """

    __slots__ = ("address_space", "_hit", "on_write")

    def __init__(self, address_space: AddressSpace) -> None:
        if not isinstance(address_space, AddressSpace):
            raise TypeError(f"GuestMemory needs an AddressSpace, not "
                            f"{type(address_space).__name__}")
        self.address_space = address_space
        self._hit: tuple[FlatView, FlatRange] | None = None
        self.on_write: Callable[[HostMemory, int, int], None] | None = None
        """Told (host memory, offset, size) of every write: migration marks the
        pages the VMM writes (rings, responses) dirty, as KVM does the guest's."""

    def read(self, gpa: int, size: int) -> bytes:
        """Copy ``size`` bytes of guest RAM starting at ``gpa``."""
        pieces = self._resolve(gpa, size, write=False)
        try:
            if len(pieces) == 1:        # the common case: one RAM range
                fr, offset, length = pieces[0]
                return self._host(fr).read(offset, length)
            return b"".join(self._host(fr).read(offset, length) for fr, offset, length in pieces)
        except (HostMemoryError, ValueError) as exc:
            raise GuestMemoryError(f"guest read of [{gpa:#x}, +{size:#x}) failed: {exc}") from exc

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` into guest RAM starting at ``gpa``."""
        view = memoryview(data).cast("B")
        pieces = self._resolve(gpa, len(view), write=True)
        try:
            done = 0
            for fr, offset, length in pieces:
                host = self._host(fr)
                host.write(offset, view[done:done + length])
                if self.on_write is not None:      # KVM's dirty log does not see the VMM
                    self.on_write(host, offset, length)
                done += length
        except (HostMemoryError, ValueError) as exc:
            raise GuestMemoryError(f"guest write of [{gpa:#x}, +{len(view):#x}) failed: "
                                   f"{exc}") from exc

    def check(self, gpa: int, size: int, *, write: bool = False) -> None:
        """Raise :class:`GuestMemoryError` unless ``[gpa, gpa+size)`` is RAM
        (writable RAM with ``write``); accesses nothing."""
        self._resolve(gpa, size, write=write)

    def is_ram(self, gpa: int, size: int, *, write: bool = False) -> bool:
        """Whether :meth:`check` would pass."""
        try:
            self._resolve(gpa, size, write=write)
        except GuestMemoryError:
            return False
        return True

    # -- internals --------------------------------------------------------------

    @staticmethod
    def _host(fr: FlatRange) -> HostMemory:
        host = fr.region.host
        assert host is not None      # RAM ranges always have host memory
        return host

    def _resolve(self, gpa: int, size: int, *, write: bool
                 ) -> list[tuple[FlatRange, int, int]]:
        """Split ``[gpa, gpa+size)`` into (range, host offset, length) pieces,
        each inside one RAM range; refuse the access if any part is not."""
        if not isinstance(gpa, int) or not isinstance(size, int):
            raise TypeError("guest address and size must be ints")
        end = gpa + size
        if gpa < 0 or size < 0 or end > _ADDR_END:
            raise GuestMemoryError(f"[{gpa:#x}, +{size:#x}) is not a range of the 64-bit "
                                   "guest-physical space")
        if size == 0:
            return []               # an empty range touches nothing
        view = self.address_space.flatview
        hit = self._hit
        if hit is not None and hit[0] is view:
            last = hit[1]
            if last.start <= gpa and end <= last.start + last.size:
                return [self._piece(last, gpa, size, write)]
        pieces: list[tuple[FlatRange, int, int]] = []
        addr = gpa
        while True:
            fr = view.lookup(addr)
            if fr is None or not fr.is_ram:
                what = "unmapped" if fr is None else f"not RAM ({fr.name!r})"
                raise GuestMemoryError(f"guest {'write' if write else 'read'} of "
                                       f"[{gpa:#x}, +{size:#x}): {addr:#x} is {what}")
            length = min(end, fr.start + fr.size) - addr
            pieces.append(self._piece(fr, addr, length, write))
            addr += length
            if addr >= end:
                break
        self._hit = (view, fr)
        return pieces

    @staticmethod
    def _piece(fr: FlatRange, addr: int, length: int, write: bool) -> tuple[FlatRange, int, int]:
        if write and fr.readonly:
            raise GuestMemoryError(f"guest write at {addr:#x}: {fr.name!r} is read-only")
        return fr, fr.region.host_offset + fr.offset + (addr - fr.start), length
