"""The VMM's side of dirty logging: which guest pages were written since the
last time they were taken, kept only for memory that is mapped.

QEMU keeps one dirty bitmap per RAM block, as large as the block: for a
1 TiB virtio-mem device 32 MiB of bitmap whatever is plugged (its
``ram_list.dirty_memory`` and the migration bitmap). kvmmem keeps a bitmap
per *mapped range* instead, in the host memory's own offsets, created the
first time the range has a dirty page: a 1 TiB device with 1 GiB plugged
costs 32 KiB of bitmap. The KVM listener (``KvmMemoryListener.sync_dirty_log``)
merges what KVM reports, and harvests a memslot before it deletes it, so a
memslot replaced while logging (``exact``'s merges) loses no page.

Pages are 4 KiB (:data:`PAGE_SIZE`); bit ``i`` of a bitmap is page ``i`` of
its range, bytes little-endian as KVM's ``KVM_GET_DIRTY_LOG`` gives them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from kvmmem.memory.host import PAGE_SIZE, HostMemory

__all__ = ["DirtyLog", "DirtyRange"]

DirtyRange = tuple[HostMemory, int, int]
"""(host memory, offset, size): a run of dirty pages, in the host memory's offsets."""


class DirtyLog:
    """Dirty pages by host memory and offset, merged from every sync."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # host memory id -> (host memory, {range offset: (pages, bitmap as int)})
        self._ranges: dict[int, tuple[HostMemory, dict[int, tuple[int, int]]]] = {}

    def merge(self, host: HostMemory, offset: int, pages: int, bitmap: bytes) -> None:
        """Add the pages set in ``bitmap`` (``pages`` pages from ``offset``)."""
        bits = int.from_bytes(bitmap, "little") & ((1 << pages) - 1)
        if not bits:
            return
        with self._lock:
            _, by_offset = self._ranges.setdefault(host.id, (host, {}))
            old_pages, old_bits = by_offset.get(offset, (0, 0))
            by_offset[offset] = (max(pages, old_pages), old_bits | bits)

    def mark(self, host: HostMemory, offset: int, size: int) -> None:
        """Mark ``[offset, offset + size)`` dirty (written by the VMM itself)."""
        first, last = offset // PAGE_SIZE, -(-(offset + size) // PAGE_SIZE)
        pages = last - first
        self.merge(host, first * PAGE_SIZE, pages, ((1 << pages) - 1).to_bytes(-(-pages // 8),
                                                                                "little"))

    def take(self) -> list[DirtyRange]:
        """Every dirty run, in order, and forget them (the caller copies them)."""
        with self._lock:
            ranges, self._ranges = self._ranges, {}
        runs: list[DirtyRange] = []
        for host, by_offset in ranges.values():
            pages = {offset // PAGE_SIZE + i for offset, (n, bits) in by_offset.items()
                     for i in _set_bits(bits)}
            runs.extend((host, first * PAGE_SIZE, n * PAGE_SIZE) for first, n in _runs(pages))
        return runs

    @property
    def pages(self) -> int:
        """Dirty pages held (a page in overlapping ranges counted once per range)."""
        with self._lock:
            return sum(bin(bits).count("1") for _, by_offset in self._ranges.values()
                       for _, bits in by_offset.values())

    @property
    def bitmap_bytes(self) -> int:
        """What the bitmaps take: one bit per page of each range that has a dirty page."""
        with self._lock:
            return sum(-(-n // 8) for _, by_offset in self._ranges.values()
                       for n, _ in by_offset.values())


def _set_bits(bits: int) -> Iterator[int]:
    index = 0
    while bits:
        low = (bits & -bits).bit_length() - 1
        index += low
        yield index
        bits >>= low + 1
        index += 1


def _runs(pages: set[int]) -> Iterator[tuple[int, int]]:
    """(first, count) of each run of consecutive pages."""
    ordered = sorted(pages)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        yield ordered[i], j - i + 1
        i = j + 1
