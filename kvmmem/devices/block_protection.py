"""``protect=block``: the guest reaches no unplugged block, even inside a mapped memslot.

One invariant, kept by this component alone: a block's host pages are
guarded (``MADV_GUARD_INSTALL``, else ``mprotect``) exactly when the block
is unplugged and a mapped memslot covers it. Outside mapped memslots the
missing memslot already keeps the guest out, and a guard costs page tables,
so none is set there. The device calls it at the points where one of the two
conditions changes: before plugging blocks (unguard), after unplugging them
(guard), before mapping memslots and after unmapping them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from kvmmem.devices.memslot_policy import MemslotSpan
from kvmmem.devices.plug_bitmap import PlugBitmap
from kvmmem.memory.host import HostMemory


class BlockProtection:
    """Guards the unplugged blocks of mapped memslots on the host."""

    def __init__(self, host: HostMemory, block_size: int, bitmap: PlugBitmap,
                 memslot_at: Callable[[int], tuple[MemslotSpan, bool]]) -> None:
        self.host = host
        self.block_size = block_size
        self._bitmap = bitmap
        self._memslot_at = memslot_at

    def guarded(self, first: int, n: int) -> bool:
        """Whether blocks [first, first+n) are guard-protected on the host."""
        return self.host.is_protected(first * self.block_size, n * self.block_size)

    def before_plug(self, first: int, n: int) -> None:
        """Blocks about to be plugged: remove their guards."""
        for offset, size in self._mapped_pieces(first, n):
            self.host.unprotect(offset, size)

    def after_unplug(self, first: int, n: int) -> None:
        """Blocks just unplugged: guard them where a mapped memslot covers them."""
        for offset, size in self._mapped_pieces(first, n):
            self.host.protect(offset, size)

    def before_map(self, spans: Iterable[MemslotSpan]) -> None:
        """Memslots about to be mapped: guard their unplugged blocks."""
        for offset, size in self._unplugged(spans):
            self.host.protect(offset, size)

    def after_unmap(self, spans: Iterable[MemslotSpan]) -> None:
        """Memslots unmapped (or a mapping that failed): remove their guards."""
        for offset, size in self._unplugged(spans):
            self.host.unprotect(offset, size)

    def _unplugged(self, spans: Iterable[MemslotSpan]) -> Iterator[tuple[int, int]]:
        """Byte ranges of the unplugged blocks inside ``spans``."""
        bs = self.block_size
        for span in spans:
            pos, end = span.offset // bs, span.end // bs
            for first, n in self._bitmap.plugged_runs(pos, end - pos):
                if first > pos:
                    yield pos * bs, (first - pos) * bs
                pos = first + n
            if pos < end:
                yield pos * bs, (end - pos) * bs

    def _mapped_pieces(self, first: int, n: int) -> Iterator[tuple[int, int]]:
        """Byte ranges of blocks [first, first+n) that lie in mapped memslots."""
        bs = self.block_size
        start, end = first * bs, (first + n) * bs
        while start < end:
            span, mapped = self._memslot_at(start)
            stop = min(end, span.end)
            if mapped:
                yield start, stop - start
            start = stop
