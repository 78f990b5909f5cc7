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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from kvmmem.memory.region import ADDR_SPACE_END, MemoryRegion, RegionKind

__all__ = ["FlatRange", "FlatView", "render", "render_placed", "simplify", "diff", "splice"]


_start_of = attrgetter("start")
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
    """An immutable rendered view of one root region, with O(log n) lookup.

    The ranges are kept in chunks of about ``_CHUNK``, which a view shares
    with the views spliced from it: replacing a window (see :func:`splice`)
    copies a few chunks and the chunk index, not every range, so a commit
    among thousands of memslots stays cheap, and readers holding the old
    view are never disturbed (what Python can do in place of RCU).
    """

    __slots__ = ("root", "_chunks", "_keys", "_len", "_flat")

    def __init__(self, root: MemoryRegion | None, ranges: Sequence[FlatRange]) -> None:
        flat = tuple(ranges)
        chunks = _chunked(list(flat), [fr.start for fr in flat])
        self._init(root, tuple(chunks), [st[0] for _, st in chunks], len(flat), flat)

    def _init(self, root: MemoryRegion | None, chunks: tuple[_Chunk, ...], keys: list[int],
              length: int, flat: tuple[FlatRange, ...] | None) -> None:
        self.root = root
        self._chunks = chunks               # ((ranges, their starts), ...)
        self._keys = keys                   # the first start of each chunk
        self._len = length
        self._flat = flat                   # all ranges, once asked for

    @property
    def ranges(self) -> tuple[FlatRange, ...]:
        """All ranges by address (built on first use for a spliced view)."""
        flat = self._flat
        if flat is None:
            flat = self._flat = tuple(fr for chunk, _ in self._chunks for fr in chunk)
        return flat

    def lookup(self, addr: int) -> FlatRange | None:
        """The range holding ``addr``, or None where nothing is mapped."""
        c = bisect.bisect_right(self._keys, addr) - 1
        if c < 0:
            return None
        chunk, starts = self._chunks[c]
        r = chunk[bisect.bisect_right(starts, addr) - 1]
        return r if addr < r.start + r.size else None

    def __iter__(self) -> Iterator[FlatRange]:
        for chunk, _ in self._chunks:
            yield from chunk

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        root = self.root.name if self.root is not None else None
        return f"<FlatView root={root!r} ranges={len(self)}>"


_CHUNK = 64
_Chunk = tuple[tuple[FlatRange, ...], list[int]]      # ranges, their starts


def _chunked(ranges: list[FlatRange], starts: list[int]) -> list[_Chunk]:
    if len(ranges) <= _CHUNK:
        return [(tuple(ranges), starts)] if ranges else []
    return [(tuple(ranges[k:k + _CHUNK]), starts[k:k + _CHUNK])
            for k in range(0, len(ranges), _CHUNK)]


def render(root: MemoryRegion) -> list[FlatRange]:
    """Render ``root`` over the whole 64-bit space (unmerged; see :func:`simplify`).

    The returned list is shared with the region caches: do not modify it.
    Unchanged since the last call means the very same list object.
    """
    return _render(root, root.addr, 0, ADDR_SPACE_END, False, False, None)


def render_placed(mr: MemoryRegion, base: int, readonly: bool, unmergeable: bool
                  ) -> list[FlatRange]:
    """Render ``mr`` whole at ``base`` under flags inherited from its containers
    (simplified). The caller vouches that nothing clips or covers it."""
    return simplify(_render(mr, base, base, base + mr.size, readonly, unmergeable, None))


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


def splice(view: FlatView, windows: Sequence[tuple[int, int, list[FlatRange]]]
           ) -> tuple[FlatView, list[FlatRange], list[FlatRange]] | None:
    """``view`` with the contents of each window [lo, hi) replaced.

    ``windows`` are sorted, disjoint, and each holds its new simplified
    ranges. Returns (new view, removed, added) in address order, or None
    when a range of ``view`` straddles a window edge or a new range could
    merge with a neighbour (the caller then renders everything).
    """
    chunks, keys, length = view._chunks, view._keys, view._len
    removed: list[FlatRange] = []
    added: list[FlatRange] = []
    for lo, hi, new in windows:
        # The chunks from the one holding the last range before lo to the one
        # holding the first range from hi on: the window and its neighbours.
        # Mostly that is one chunk, whose neighbours in the next ones are
        # looked at where needed.
        a = bisect.bisect_right(keys, lo) - 1
        if a < 0:
            a = 0
        b = a + 1
        if b < len(chunks) and keys[b] < hi:
            b = bisect.bisect_left(keys, hi)          # the window spans chunks
        elif b > len(chunks):
            b = len(chunks)                           # an empty view
        if b - a == 1:
            chunk, starts = chunks[a]
        else:
            chunk, starts = (), []
            for part, part_starts in chunks[a:b]:
                chunk += part
                starts = starts + part_starts
        i = bisect.bisect_left(starts, lo)
        j = bisect.bisect_left(starts, hi, i)
        before = chunk[i - 1] if i else (chunks[a - 1][0][-1] if a else None)
        after = chunk[j] if j < len(chunk) else (chunks[b][0][0] if b < len(chunks) else None)
        if (before is not None and before.start + before.size > lo) or \
                (j > i and chunk[j - 1].start + chunk[j - 1].size > hi):
            return None
        # (unmergeable ranges, most of a memslot-heavy view, are tested first)
        if new:
            first, last = new[0], new[-1]
            if (before is not None and not first.unmergeable and _mergeable(before, first)) \
                    or (after is not None and not last.unmergeable and _mergeable(last, after)):
                return None
            added += new
        elif before is not None and after is not None and not before.unmergeable \
                and _mergeable(before, after):
            return None
        if j > i:
            removed += chunk[i:j]
        chunk = chunk[:i] + tuple(new) + chunk[j:]
        starts = starts[:i] + list(map(_start_of, new)) + starts[j:]
        length += len(new) - (j - i)
        if len(chunk) > 2 * _CHUNK or b - a != 1:
            pieces = _chunked(list(chunk), starts)
            firsts = [part_starts[0] for _, part_starts in pieces]
        elif chunk:
            pieces, firsts = [(chunk, starts)], [starts[0]]
        else:
            pieces, firsts = [], []
        chunks = chunks[:a] + tuple(pieces) + chunks[b:]
        keys = keys[:a] + firsts + keys[b:]
    spliced = FlatView.__new__(FlatView)
    spliced._init(view.root, chunks, keys, length, None)
    return spliced, removed, added
