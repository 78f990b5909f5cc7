"""Which memslots a virtio-mem device maps: one policy object per ``memslots`` mode.

A memslot is a span ``(offset, size)`` of the device's region, mapped as one
unmergeable alias and so one KVM memslot. The policy, chosen when the device
is realized, answers for each kind of change which spans to unmap and which
to map; the device applies the answer (:mod:`virtio_mem_backing`) and then
tells the policy it took effect (:meth:`MemslotPolicy.commit`). The modes:

- ``single``: the RAM region itself, one memslot, always (QEMU before
  ``memslots``);
- ``usable``: the grid memslots intersecting ``[0, usable_region_size)``
  (QEMU's "virtio-mem: Expose device memory via multiple memslots");
- ``dynamic``: the grid memslots holding a plugged block (QEMU 8.2's
  ``dynamic-memslots``: ``virtio_mem_activate_memslots_to_plug`` and
  ``virtio_mem_deactivate_unplugged_memslots``);
- ``exact``: memslots over exactly the plugged blocks, few per run of
  plugged blocks (:mod:`exact_cover`), whole grid memslots only where the
  budget needs them. Merging and splitting replaces memslots over plugged
  memory: see :meth:`MemslotPolicy.deletes_plugged`.

Grid memslots are ``memslot_size`` bytes, the last one possibly shorter.
The plug-side questions are asked after the bitmap changed.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from kvmmem.devices.exact_cover import CoverPlan, ExactCover
from kvmmem.devices.plug_bitmap import PlugBitmap
from kvmmem.devices.ratelimit import RateLimit

log = logging.getLogger(__name__)


class MemslotMode(StrEnum):
    """How a device's memory is mapped into KVM (the device's ``memslots`` property)."""

    SINGLE = "single"
    USABLE = "usable"
    DYNAMIC = "dynamic"
    EXACT = "exact"


ALIAS_NAME = "virtio-mem-memslot-{}"


@dataclass(frozen=True, order=True)
class MemslotSpan:
    """One memslot: ``size`` bytes at ``offset`` in the device's region."""

    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


class MemslotChange(NamedTuple):
    """Spans to unmap, then spans to map; both sorted by offset. False when
    empty. (A named tuple: one is built on every request that maps or unmaps.)"""

    unmap: tuple[MemslotSpan, ...] = ()
    map: tuple[MemslotSpan, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.unmap or self.map)


NO_CHANGE = MemslotChange()


class MemslotPolicy(ABC):
    """Which spans of the device region are memslots, now and after a change.

    ``bitmap`` is read, never written. ``mapped`` is what the policy has
    committed; every answer is relative to it.
    """

    mode: MemslotMode
    name = "virtio-mem"
    """The device's id, for log lines (set by :func:`make_policy`)."""
    maps_aliases = True
    """False: the RAM region itself is the mapping (``single``), no aliases."""

    def __init__(self, region_size: int, memslot_size: int, block_size: int,
                 bitmap: PlugBitmap) -> None:
        if memslot_size <= 0 or memslot_size % block_size:
            raise ValueError(f"memslot size {memslot_size:#x} must be a positive multiple "
                             f"of the block size {block_size:#x}")
        self.region_size = region_size
        self.memslot_size = memslot_size
        self.block_size = block_size
        self._bitmap = bitmap
        # Mapped spans by offset (they never overlap): int keys keep the
        # request path free of dataclass __hash__/__eq__ calls.
        self._mapped: dict[int, MemslotSpan] = {}
        self._grid: dict[int, MemslotSpan] = {}

    # -- what is mapped -------------------------------------------------------

    @property
    def mapped(self) -> frozenset[MemslotSpan]:
        return frozenset(self._mapped.values())

    @property
    def nb_mapped(self) -> int:
        return len(self._mapped)

    def is_mapped(self, span: MemslotSpan) -> bool:
        mapped = self._mapped.get(span.offset)
        return mapped is not None and mapped.size == span.size

    def memslot_at(self, offset: int) -> tuple[MemslotSpan, bool]:
        """The memslot holding byte ``offset`` of the region, and whether it
        is mapped (a policy without a grid answers the unmapped gap)."""
        span = self.grid_span(offset // self.memslot_size)
        return span, self.is_mapped(span)

    def alias_name(self, span: MemslotSpan) -> str:
        """The memory-region name of a span's alias (QEMU's for grid memslots)."""
        return ALIAS_NAME.format(span.offset // self.memslot_size)

    # -- the grid -------------------------------------------------------------

    @property
    def nb_grid(self) -> int:
        return -(-self.region_size // self.memslot_size)

    def grid_span(self, index: int) -> MemslotSpan:
        """Grid memslot ``index`` (one object per index, made when first asked)."""
        span = self._grid.get(index)
        if span is None:
            if type(index) is not int or not 0 <= index < self.nb_grid:
                raise ValueError(f"memslot index {index!r} is outside 0..{self.nb_grid - 1}")
            offset = index * self.memslot_size
            span = self._grid[index] = MemslotSpan(offset, min(self.memslot_size,
                                                               self.region_size - offset))
        return span

    def grid_spans(self, first: int, n: int) -> list[MemslotSpan]:
        """The grid spans that blocks ``[first, first + n)`` lie in."""
        per_slot = self.memslot_size // self.block_size
        grid = self._grid
        return [grid.get(i) or self.grid_span(i)
                for i in range(first // per_slot, (first + n - 1) // per_slot + 1)]

    def spans(self) -> Iterator[MemslotSpan]:
        """Every memslot the device can have, mapped or not (for listings)."""
        for index in range(self.nb_grid):
            yield self.grid_span(index)

    # -- the questions ----------------------------------------------------------

    def plug(self, first: int, n: int) -> MemslotChange:
        """Blocks ``[first, first + n)`` were just plugged."""
        return NO_CHANGE

    def unplug(self, first: int, n: int) -> MemslotChange:
        """Blocks ``[first, first + n)`` were just unplugged."""
        return NO_CHANGE

    @abstractmethod
    def resync(self, usable_region_size: int) -> MemslotChange:
        """The usable region is now ``usable_region_size`` (a ``requested-size``
        change, UNPLUG_ALL or reset, after the bitmap changed; also realize)."""

    defer_merges = False
    """Plugs leave merges to :meth:`merge` (``exact`` with a ``merge-delay``)."""
    @property
    def merge_pending(self) -> bool:
        """Whether :meth:`merge` has memslots to merge (deferred merges, ``exact``)."""
        return False

    def merge(self, one_group: bool = False) -> MemslotChange:
        """The deferred merges, now (``exact`` with ``merge-delay``; see
        :meth:`ExactCover.plan_merge` for ``one_group``)."""
        return NO_CHANGE

    def unmap_all(self) -> MemslotChange:
        """Everything goes (the device is unrealized)."""
        return MemslotChange(tuple(sorted(self._mapped.values())), ())

    def deletes_plugged(self, change: MemslotChange) -> bool:
        """Whether ``change`` deletes a memslot covering plugged blocks, so
        that vCPUs must not run between its delete and its create."""
        bs, bits = self.block_size, self._bitmap
        return any(bits.any_in_state(s.offset // bs, -(-s.size // bs), plugged=True)
                   for s in change.unmap)

    def commit(self, change: MemslotChange) -> None:
        """``change`` has been applied."""
        mapped = self._mapped
        for span in change.unmap:
            del mapped[span.offset]
        for span in change.map:
            mapped[span.offset] = span

    def _towards(self, wanted: Iterable[MemslotSpan]) -> MemslotChange:
        want = {s.offset: s for s in wanted}
        mapped = self._mapped
        return MemslotChange(
            tuple(sorted(s for o, s in mapped.items() if want.get(o) != s)),
            tuple(sorted(s for o, s in want.items() if mapped.get(o) != s)))


class SinglePolicy(MemslotPolicy):
    """The RAM region itself at the device's address: one memslot, always."""

    mode = MemslotMode.SINGLE
    maps_aliases = False

    def __init__(self, region_size: int, memslot_size: int, block_size: int,
                 bitmap: PlugBitmap) -> None:
        super().__init__(region_size, region_size, block_size, bitmap)
        self._mapped[0] = self.grid_span(0)

    def resync(self, usable_region_size: int) -> MemslotChange:
        return NO_CHANGE

    def unmap_all(self) -> MemslotChange:
        return NO_CHANGE


class UsablePolicy(MemslotPolicy):
    """Every grid memslot intersecting the usable region."""

    mode = MemslotMode.USABLE

    def resync(self, usable_region_size: int) -> MemslotChange:
        if not 0 <= usable_region_size <= self.region_size:
            raise ValueError(f"usable region size {usable_region_size:#x} is outside "
                             f"0..{self.region_size:#x}")
        count = -(-usable_region_size // self.memslot_size)
        return self._towards(self.grid_span(i) for i in range(count))


class DynamicPolicy(MemslotPolicy):
    """Every grid memslot holding a plugged block; a request touches only its own."""

    mode = MemslotMode.DYNAMIC

    def plug(self, first: int, n: int) -> MemslotChange:
        # virtio_mem_activate_memslots_to_plug: the range's memslots not yet mapped
        mapped, size, grid = self._mapped, self.memslot_size, self._grid
        per_slot = size // self.block_size
        new: list[MemslotSpan] = []
        for index in range(first // per_slot, (first + n - 1) // per_slot + 1):
            if index * size not in mapped:
                new.append(grid.get(index) or self.grid_span(index))
        return MemslotChange((), tuple(new)) if new else NO_CHANGE

    def unplug(self, first: int, n: int) -> MemslotChange:
        # virtio_mem_deactivate_unplugged_memslots: the range's mapped memslots now empty
        mapped, size, bits = self._mapped, self.memslot_size, self._bitmap
        per_slot = size // self.block_size
        empty: list[MemslotSpan] = []
        for index in range(first // per_slot, (first + n - 1) // per_slot + 1):
            span = mapped.get(index * size)
            if span is not None and bits.find(True, index * per_slot,
                                              min(bits.nb_blocks, (index + 1) * per_slot)) == -1:
                empty.append(span)
        return MemslotChange(tuple(empty), ()) if empty else NO_CHANGE

    def resync(self, usable_region_size: int) -> MemslotChange:
        wanted: set[MemslotSpan] = set()
        for first, n in self._bitmap.plugged_runs():
            wanted.update(self.grid_spans(first, n))
        return self._towards(wanted)


class ExactPolicy(MemslotPolicy):
    """Memslots over exactly the plugged blocks: the maximal chunks of
    :class:`~kvmmem.devices.exact_cover.ExactCover`, within the reservation
    ``dynamic`` gets (one memslot per grid memslot), falling back to whole
    grid memslots where the chunks would need more."""

    mode = MemslotMode.EXACT

    def __init__(self, region_size: int, memslot_size: int, block_size: int,
                 bitmap: PlugBitmap) -> None:
        super().__init__(region_size, memslot_size, block_size, bitmap)
        self.cover = ExactCover(bitmap.nb_blocks, block_size, memslot_size // block_size,
                                self.nb_grid)
        self._pending: tuple[MemslotChange, CoverPlan] | None = None
        self.coarsen_log = RateLimit()
        self.refine_log = RateLimit()

    def plug(self, first: int, n: int) -> MemslotChange:
        return self._propose(self.cover.plan_plug(self._bitmap, first, n,
                                                  merge=not self.defer_merges))

    @property
    def merge_pending(self) -> bool:
        return self.cover.merge_pending

    def merge(self, one_group: bool = False) -> MemslotChange:
        return self._propose(self.cover.plan_merge(self._bitmap, one_group))

    def unplug(self, first: int, n: int) -> MemslotChange:
        return self._propose(self.cover.plan_unplug(self._bitmap, first, n))

    def resync(self, usable_region_size: int) -> MemslotChange:
        # The cover follows the bitmap alone; here it can only have been cleared.
        if self._bitmap.plugged_count:
            return NO_CHANGE
        return self._propose(self.cover.plan_clear())

    def unmap_all(self) -> MemslotChange:
        return self._propose(self.cover.plan_clear())

    def deletes_plugged(self, change: MemslotChange) -> bool:
        pending = self._pending
        if pending is not None and pending[0] is change:
            return pending[1].replaces_plugged
        return super().deletes_plugged(change)

    def commit(self, change: MemslotChange) -> None:
        super().commit(change)
        pending = self._pending
        if pending is not None and pending[0] is change:
            self._pending = None
            self._settle(pending[1])

    def memslot_at(self, offset: int) -> tuple[MemslotSpan, bool]:
        bs, cover = self.block_size, self.cover
        block = offset // bs
        span = cover.span_at(block)
        if span is not None:
            return MemslotSpan(span[0] * bs, span[1] * bs), True
        # the unplugged gap, up to the next plugged block of this grid memslot
        end = min((block // cover.cell_blocks + 1) * cover.cell_blocks, cover.nb_blocks)
        stop = self._bitmap.find(True, block, end)
        return MemslotSpan(block * bs, ((end if stop < 0 else stop) - block) * bs), False

    def alias_name(self, span: MemslotSpan) -> str:
        """Grid memslot names: ``virtio-mem-memslot-3`` for a whole grid
        memslot, ``-8-15`` for several, ``-3@0x200000`` for a part of one."""
        first, last = span.offset // self.memslot_size, (span.end - 1) // self.memslot_size
        if span.offset % self.memslot_size:
            return f"{ALIAS_NAME.format(first)}@{span.offset % self.memslot_size:#x}"
        if span.size < self.memslot_size and span.end != self.region_size:
            return f"{ALIAS_NAME.format(first)}@0x0"
        return ALIAS_NAME.format(first) + (f"-{last}" if last != first else "")

    def spans(self) -> Iterator[MemslotSpan]:
        """The memslots mapped now (exact spans exist only while mapped)."""
        return iter(sorted(self._mapped.values()))

    def _propose(self, plan: CoverPlan) -> MemslotChange:
        bs = self.block_size
        change = MemslotChange(tuple(MemslotSpan(s * bs, n * bs) for s, n in plan.delete),
                               tuple(MemslotSpan(s * bs, n * bs) for s, n in plan.create))
        if not change:                      # nothing for the device to apply: settle now
            self._pending = None
            self._settle(plan)
            return NO_CHANGE
        self._pending = (change, plan)
        return change

    def _settle(self, plan: CoverPlan) -> None:
        self.cover.commit(plan)
        size = self.memslot_size
        # A guest plugging and unplugging at the edge of the budget would
        # otherwise make one line per two requests: rate-limited.
        if plan.coarsened and (held := self.coarsen_log.check()) is not None:
            log.warning("%s: memslots=exact would need more than its %d memslots: grid memslot(s) "
                        "%s mapped whole (%d MiB each), as memslots=dynamic does%s", self.name,
                        self.cover.limit, ", ".join(map(str, plan.coarsened)), size >> 20,
                        RateLimit.note(held))
        if plan.refined and (held := self.refine_log.check()) is not None:
            log.info("%s: memslots=exact back to exact memslots in grid memslot(s) %s "
                     "(%d memslots now)%s", self.name, ", ".join(map(str, plan.refined)),
                     self.cover.count, RateLimit.note(held))


_POLICIES: dict[MemslotMode, type[MemslotPolicy]] = {
    MemslotMode.SINGLE: SinglePolicy, MemslotMode.USABLE: UsablePolicy,
    MemslotMode.DYNAMIC: DynamicPolicy, MemslotMode.EXACT: ExactPolicy}


def make_policy(mode: MemslotMode, region_size: int, memslot_size: int, block_size: int,
                bitmap: PlugBitmap, name: str = "virtio-mem") -> MemslotPolicy:
    """The policy of ``mode`` for a device region (at realize); ``name`` is
    the device's id, for log lines."""
    policy = _POLICIES[MemslotMode(mode)](region_size, memslot_size, block_size, bitmap)
    policy.name = name
    return policy
