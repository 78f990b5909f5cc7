"""Flat views: the region tree rendered into the guest-physical map.

Rendering walks the tree like a guest access would be decoded: subregions
in priority order, each clipped to its parent, aliases continued at their
target, and a RAM/I/O region filling whatever its own subregions left free.
The result is a sorted list of non-overlapping :class:`FlatRange` objects.

Each region caches its last rendering together with the inputs it was
rendered for (position, clip window, inherited flags).  A mutation drops the
cache of the mutated region and of the regions above it only, so after
adding one alias to a container of 1000 the re-render of that container is
1000 cache hits and one new range, and the lists of unchanged subtrees are
reused object for object, which also makes the diff of old and new view
cheap (identity comparisons).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Iterator, Sequence

from kvmmem.memory.region import ADDR_SPACE_END, MemoryRegion, RegionKind

__all__ = ["FlatRange", "FlatView", "render", "simplify", "diff"]

_range_start = attrgetter("start")

_ALIAS = RegionKind.ALIAS
_CONTAINER = RegionKind.CONTAINER
_EMPTY: list[FlatRange] = []


@dataclass(frozen=True, slots=True)
class FlatRange:
    """A guest-physical range served by one terminal (RAM or I/O) region.

    ``offset`` is where the range starts inside ``region``.  ``alias`` is the
    innermost alias the range was reached through, kept for names only (it
    takes no part in comparisons, so re-routing through an equivalent alias
    is no change).
    """

    start: int
    size: int
    region: MemoryRegion
    offset: int
    readonly: bool = False
    unmergeable: bool = False
    alias: MemoryRegion | None = field(default=None, compare=False)

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.start + self.size

    @property
    def is_ram(self) -> bool:
        return self.region.kind is RegionKind.RAM

    @property
    def host_address(self) -> int:
        """Host virtual address backing ``start`` (RAM ranges only)."""
        return self.region.host_address(self.offset)

    @property
    def name(self) -> str:
        """The alias name when reached through one, else the region's."""
        return (self.alias or self.region).name

    def sliced(self, start: int, end: int) -> FlatRange:
        """The part ``[start, end)`` of this range."""
        return FlatRange(start, end - start, self.region, self.offset + (start - self.start),
                         self.readonly, self.unmergeable, self.alias)


class FlatView:
    """An immutable rendered view of one root region, with O(log n) lookup."""

    __slots__ = ("root", "ranges", "_starts")

    def __init__(self, root: MemoryRegion | None, ranges: Sequence[FlatRange]) -> None:
        self.root = root
        self.ranges: tuple[FlatRange, ...] = tuple(ranges)
        self._starts = list(map(_range_start, self.ranges))

    def lookup(self, addr: int) -> FlatRange | None:
        """The range holding ``addr``, or None where nothing is mapped."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self.ranges[i]
            if addr < r.start + r.size:
                return r
        return None

    def __iter__(self) -> Iterator[FlatRange]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __repr__(self) -> str:
        root = self.root.name if self.root is not None else None
        return f"<FlatView root={root!r} ranges={len(self.ranges)}>"


def render(root: MemoryRegion) -> list[FlatRange]:
    """Render ``root`` over the whole 64-bit space (unmerged; see :func:`simplify`).

    The returned list is shared with the region caches: do not modify it.
    Unchanged since the last call means the very same list object.
    """
    return _render(root, root.addr, 0, ADDR_SPACE_END, False, False, None)


def _render(mr: MemoryRegion, base: int, lo: int, hi: int, ro: bool, unm: bool,
            via: MemoryRegion | None) -> list[FlatRange]:
    """Ranges of ``mr`` placed with its offset 0 at ``base``, clipped to [lo, hi)."""
    if not mr.enabled:
        return _EMPTY
    start = base if base > lo else lo
    end = base + mr.size
    if end > hi:
        end = hi
    if start >= end:
        return _EMPTY
    ro = ro or mr.readonly
    unm = unm or mr.unmergeable
    key = (base, start, end, ro, unm, via)
    cached = mr._rcache
    if cached is not None and cached[0] == key:
        return cached[1]

    kind = mr.kind
    if kind is _ALIAS:
        assert mr.target is not None
        out = _render(mr.target, base - mr.alias_offset, start, end, ro, unm, mr)
    elif mr._children:
        parts = []
        for child in mr._children:
            sub = _render(child, base + child.addr, start, end, ro, unm, via)
            if sub:
                parts.append(sub)
        if kind is _CONTAINER:
            out = _combine(parts)
        else:
            background = FlatRange(start, end - start, mr, start - base, ro, unm, via)
            out = _overlay(parts + [[background]])
    elif kind is _CONTAINER:
        out = _EMPTY
    else:
        out = [FlatRange(start, end - start, mr, start - base, ro, unm, via)]
    mr._rcache = (key, out)
    return out


def _part_start(part: list[FlatRange]) -> int:
    return part[0].start


def _combine(parts: list[list[FlatRange]]) -> list[FlatRange]:
    """Merge sibling renderings given in priority order (highest first)."""
    if not parts:
        return _EMPTY
    if len(parts) == 1:
        return parts[0]
    # Common case: siblings do not overlap, so priority is moot.  Sort the
    # parts by address (nearly sorted already: a linear pass for Timsort).
    by_address = sorted(parts, key=_part_start)
    out: list[FlatRange] = []
    prev_end = -1
    for part in by_address:
        if part[0].start < prev_end:
            return _overlay(parts)
        last = part[-1]
        prev_end = last.start + last.size
        out += part
    return out


def _overlay(parts: list[list[FlatRange]]) -> list[FlatRange]:
    """Stack renderings in priority order: each only fills what earlier ones left free."""
    out: list[FlatRange] = []
    starts: list[int] = []
    ends: list[int] = []
    for part in parts:
        for fr in part:
            s, e = fr.start, fr.start + fr.size
            i = bisect.bisect_right(ends, s)      # first claimed interval ending after s
            cur = s
            while cur < e:
                next_claim = starts[i] if i < len(starts) else e
                if next_claim > cur:
                    gap_end = min(next_claim, e)
                    piece = fr if (cur == s and gap_end == e) else fr.sliced(cur, gap_end)
                    out.insert(i, piece)
                    starts.insert(i, cur)
                    ends.insert(i, gap_end)
                    i += 1
                    cur = gap_end
                else:
                    cur = max(cur, ends[i])
                    i += 1
    return out


def _mergeable(a: FlatRange, b: FlatRange) -> bool:
    return (a.region is b.region
            and a.start + a.size == b.start
            and a.offset + a.size == b.offset
            and a.readonly == b.readonly
            and not a.unmergeable and not b.unmergeable)


def simplify(ranges: Sequence[FlatRange]) -> list[FlatRange]:
    """Merge neighbours that continue the same region, except unmergeable ones."""
    out: list[FlatRange] = []
    prev: FlatRange | None = None
    for fr in ranges:
        # most ranges of a memslot-heavy view are unmergeable: test that first
        if not fr.unmergeable and prev is not None and _mergeable(prev, fr):
            alias = prev.alias if prev.alias is fr.alias else None
            prev = FlatRange(prev.start, prev.size + fr.size, prev.region, prev.offset,
                             prev.readonly, False, alias)
            out[-1] = prev
        else:
            out.append(fr)
            prev = fr
    return out


def diff(old: Sequence[FlatRange], new: Sequence[FlatRange]
         ) -> tuple[list[FlatRange], list[FlatRange]]:
    """One linear merge pass over two sorted views: (removed, added), address order."""
    removed: list[FlatRange] = []
    added: list[FlatRange] = []
    i = j = 0
    n_old, n_new = len(old), len(new)
    while i < n_old and j < n_new:
        a, b = old[i], new[j]
        if a is b or a == b:
            i += 1
            j += 1
        elif a.start < b.start:
            removed.append(a)
            i += 1
        elif b.start < a.start:
            added.append(b)
            j += 1
        else:                        # same start, different range
            removed.append(a)
            added.append(b)
            i += 1
            j += 1
    removed.extend(old[i:])
    added.extend(new[j:])
    return removed, added
