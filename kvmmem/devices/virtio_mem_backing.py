"""The memory side of a virtio-mem device: its memslot aliases and its host pages.

The device decides *what* must be mapped and accessible; this module does
it through the memory layer, never through KVM: memslot ``N`` is an
unmergeable alias ``virtio-mem-memslot-N`` of the device's RAM region inside
the container ``virtio-mem-memslots`` (QEMU's names), so mapping or
unmapping it is exactly one KVM memslot change made by the KVM listener.
In ``single`` mode the RAM region itself is mapped, as before the seed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence, Set
from contextlib import nullcontext

from kvmmem.devices.memslot_plan import MemslotMode, PlugBitmap, memslot_count, plan_changes
from kvmmem.memory.address_space import memory_transaction
from kvmmem.memory.host import HostMemory
from kvmmem.memory.region import MemoryRegion

CONTAINER_NAME = "virtio-mem-memslots"
ALIAS_NAME = "virtio-mem-memslot-{}"


class VirtioMemBacking:
    """Maps a device's memslots and guards or releases its host pages."""

    def __init__(self, host: HostMemory, mode: MemslotMode, memslot_size: int,
                 block_size: int, protect_blocks: bool) -> None:
        self.host = host
        self.mode = mode
        self.block_size = block_size
        self.protect_blocks = protect_blocks
        self.ram = MemoryRegion.ram(host.name, host)
        if mode is MemslotMode.SINGLE:
            memslot_size = host.size
            self.top = self.ram
        else:
            self.top = MemoryRegion.container(CONTAINER_NAME, host.size)
        self.memslot_size = memslot_size
        self.nb_memslots = memslot_count(memslot_size, host.size)
        self.blocks_per_memslot = memslot_size // block_size
        self._aliases: dict[int, MemoryRegion] = {}
        self._mapped: set[int] = set()

    # -- memslots --------------------------------------------------------

    def alias(self, index: int) -> MemoryRegion:
        """The (possibly not yet mapped) alias of memslot ``index``."""
        alias = self._aliases.get(index)
        if alias is None:
            offset = index * self.memslot_size
            size = min(self.memslot_size, self.host.size - offset)
            alias = MemoryRegion.alias(ALIAS_NAME.format(index), self.ram, offset, size,
                                       unmergeable=True)
            self._aliases[index] = alias
        return alias

    @property
    def mapped(self) -> frozenset[int]:
        """Indices of the mapped memslots."""
        return frozenset(self._mapped)

    @property
    def nb_mapped(self) -> int:
        return len(self._mapped)

    def set_mapped(self, wanted: Set[int], bitmap: PlugBitmap) -> None:
        """Make exactly ``wanted`` the mapped memslots (see :meth:`remap`)."""
        if self.mode is MemslotMode.SINGLE:
            return
        changes = plan_changes(self._mapped, wanted)
        self.remap(changes.unmap, changes.map, bitmap)

    def remap(self, unmap: Sequence[int], map: Sequence[int], bitmap: PlugBitmap) -> None:
        """Unmap memslots ``unmap`` and map ``map``, in one memory transaction.

        The caller knows which memslots change (a request touches a few), so
        the cost does not grow with the memslots mapped. With block
        protection, the unplugged blocks of a memslot are guarded before it
        is mapped and released after it is unmapped. On failure (KVM
        refusing a slot) the memory layer has rolled the tree and KVM back;
        the guards set here are removed again and the error raised.
        """
        if not map and not unmap:
            return
        guarded = map if self.protect_blocks else ()
        for index in guarded:
            self._guard_unplugged(index, bitmap, True)
        top, aliases, size = self.top, self._aliases, self.memslot_size
        # One mutation is its own transaction; several share one.
        batch = memory_transaction() if len(unmap) + len(map) > 1 else nullcontext()
        try:
            with batch:
                for index in unmap:
                    top.del_subregion(aliases[index])
                for index in map:
                    top.add_subregion(index * size, aliases.get(index) or self.alias(index))
        except BaseException:
            for index in guarded:
                self._guard_unplugged(index, bitmap, False)
            raise
        self._mapped.difference_update(unmap)
        self._mapped.update(map)
        if self.protect_blocks:
            for index in unmap:
                self._guard_unplugged(index, bitmap, False)

    def is_mapped(self, index: int) -> bool:
        return self.mode is MemslotMode.SINGLE or index in self._mapped

    # -- host pages ------------------------------------------------------

    def guarded(self, first: int, n: int) -> bool:
        """Whether blocks [first, first+n) are guard-protected on the host."""
        return self.host.is_protected(first * self.block_size, n * self.block_size)

    def acquire(self, first: int, n: int, prealloc: bool) -> None:
        """Make blocks usable before they are plugged: unguard, then populate."""
        if self.protect_blocks:
            for start, count in self._pieces(first, n, mapped_only=True):
                self.host.unprotect(start * self.block_size, count * self.block_size)
        if prealloc:
            try:
                self.host.populate(first * self.block_size, n * self.block_size)
            except BaseException:
                self.release([(first, n)])
                raise

    def release(self, runs: Iterable[tuple[int, int]]) -> None:
        """Give unplugged blocks back to the host: guard them where a mapped
        memslot still covers them, and discard their pages."""
        bs = self.block_size
        for first, n in runs:
            if not self.protect_blocks:
                self.host.discard(first * bs, n * bs)
                continue
            for start, count in self._pieces(first, n, mapped_only=False):
                if self.is_mapped(start // self.blocks_per_memslot):
                    self.host.protect(start * bs, count * bs)
                self.host.discard(start * bs, count * bs)

    def _guard_unplugged(self, index: int, bitmap: PlugBitmap, guard: bool) -> None:
        first, n = bitmap.memslot_blocks(index)
        for start, count in _gaps(bitmap.plugged_runs(first, n), first, first + n):
            offset, size = start * self.block_size, count * self.block_size
            if guard:
                self.host.protect(offset, size)
            else:
                self.host.unprotect(offset, size)

    def _pieces(self, first: int, n: int, mapped_only: bool) -> Iterator[tuple[int, int]]:
        """Split a block range at memslot boundaries (optionally mapped ones only)."""
        end = first + n
        while first < end:
            index = first // self.blocks_per_memslot
            stop = min(end, (index + 1) * self.blocks_per_memslot)
            if not mapped_only or self.is_mapped(index):
                yield first, stop - first
            first = stop


def _gaps(runs: Iterable[tuple[int, int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    """The complement of sorted ``(first, n)`` runs inside [start, end)."""
    pos = start
    for first, n in runs:
        if first > pos:
            yield pos, first - pos
        pos = first + n
    if pos < end:
        yield pos, end - pos
