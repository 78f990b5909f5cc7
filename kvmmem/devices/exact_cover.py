"""The memslots of ``memslots=exact``: exactly the plugged blocks, in few memslots.

Everything here counts in blocks of the device; a span is ``(first block,
number of blocks)``. No memory layer, no KVM: this module answers which
spans to delete and which to create for a plug or an unplug, and the caller
makes them memslots.

**Chunks.** A chunk is an aligned power-of-two run of blocks whose size in
bytes is the block size or a power of 8 (with 2 MiB blocks: 2 MiB, 16 MiB,
128 MiB, 1 GiB, 8 GiB, ...), and at most ``MAX_CHUNK_BYTES``. The
exact cover of the plugged blocks is the set of *maximal* fully plugged
chunks: unique for a plug state whatever the history that led to it, so a
run of N blocks is at most 7 chunks per size on each side (O(log N)), and
eight complete neighbours of one size merge into one chunk of the next.
Chunks grow to at most ``MAX_CHUNK_CELLS`` cells of the dynamic grid
(8 GiB for 1 GiB memslots): a fully plugged device then needs an eighth of
the memslots ``dynamic`` reserves for it, and no 64 GiB memslot, whose
metadata costs as much to allocate as the 64 GiB it would merge, is made
and unmade as the guest grows and shrinks.

Why powers of 8 and not of 2 (the buddy scheme): merging re-creates memslots
over plugged memory, and each memslot change costs KVM a fixed part (an SRCU
synchronization) plus the allocation of its per-page metadata. With powers
of 2 a guest that plugs 64 GiB in 128 MiB steps has every byte in memslots
of 7 sizes (128 MiB ... 8 GiB), one after the other; with powers of 8 in 3
(128 MiB, 1 GiB, 8 GiB), and the sizes fall on Linux's 128 MiB memory
blocks, on the 1 GiB memslots of ``dynamic`` and on the 2 MiB transparent
huge page. 64 GiB so plugged is 8 memslots of 8 GiB; 1 GiB plugged as one
block per GiB is 512 memslots of one block, the floor of that pattern.

**Budget fallback.** A device may hold at most ``limit`` memslots (the
reservation ``dynamic`` gets: one per cell of its memslot grid, the cells
being ``cell_blocks`` long). When the exact cover would need more, the
cells holding the most chunks are made *coarse*: a coarse cell is covered
by one memslot over the whole cell, as in ``dynamic`` (unplugged blocks in
it are inside a memslot), and no chunk reaches into it. Coarsening every
populated cell is ``dynamic`` itself, which needs at most one memslot per
cell, so ``exact`` never runs out of memslots where ``dynamic`` does not. A
coarse cell that loses its last plugged block is dropped; when the exact
cover of everything (counting each coarse cell as the chunks of its own
runs) would need at most ``limit - limit // 8`` memslots, all coarse cells
return to exact coverage at once (the eighth is hysteresis, so that one
plug and one unplug at the limit do not flip cells back and forth).

A plug or an unplug changes only chunks around the touched blocks: those it
merges or splits (the maximal chunks containing the touched blocks, and the
old chunks inside them). A plan is computed first and applied with
:meth:`ExactCover.commit` only once the memslots are in place, so a refused
memslot leaves the cover as it was.

**Deferred merges.** Merging is what makes ``exact`` cost more host time per
request than ``dynamic``: KVM allocates a memslot's metadata afresh on every
create (that allocation, not the ioctl's fixed part, is most of its cost),
so a byte that is first in a 128 MiB chunk, then in a 1 GiB one, then in an
8 GiB one has its metadata allocated three times, and a request makes two
memslot changes. ``plan_plug(..., merge=False)`` covers only the new blocks,
by the maximal chunks *inside* the plugged range (one memslot for a 128 MiB
request), and remembers the cells where a merge has become possible;
:meth:`plan_merge` later turns those cells into their maximal chunks, all
at once or one group of cells (one largest chunk's worth) per plan. Run
when the guest has stopped plugging, a burst of 64 plugs of 128 MiB becomes
one 8 GiB memslot directly: each byte allocated twice. Every plan keeps the
cover exact (no chunk over an unplugged block); only the number of memslots
is above the minimum until the merge. A deferred plug or an unplug that
would go over ``limit`` merges everything pending first (and coarsens only
if that is not enough).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

Span = tuple[int, int]

RADIX_BITS = 3                  # chunk sizes are powers of 2**3 bytes
MAX_CHUNK_BYTES = 1 << 42       # 4 TiB: KVM refuses memslots of 2**31 pages (8 TiB) or more
MAX_CHUNK_CELLS = 8             # and at most 8 cells of the dynamic grid


class PlugState(Protocol):
    """What the cover reads of the plug bitmap."""

    def any_in_state(self, first: int, n: int, plugged: bool) -> bool: ...

    def plugged_runs(self, first: int = 0, n: int | None = None) -> Iterator[tuple[int, int]]: ...

    def find(self, plugged: bool, first: int = 0, end: int | None = None) -> int: ...


def chunk_levels(nb_blocks: int, block_size: int, radix_bits: int = RADIX_BITS,
                 max_chunk_bytes: int = MAX_CHUNK_BYTES) -> tuple[int, ...]:
    """The allowed chunk sizes as powers of two in blocks, ascending: 0
    (one block) and every ``L`` whose ``2**L`` blocks are a power of
    ``2**radix_bits`` bytes that fits the device and ``max_chunk_bytes``."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block size {block_size:#x} is not a power of two")
    if nb_blocks <= 0 or radix_bits <= 0:
        raise ValueError(f"nb_blocks {nb_blocks} and radix_bits {radix_bits} must be positive")
    shift = block_size.bit_length() - 1
    levels = [0]
    level = 1
    while (1 << level) <= nb_blocks and (block_size << level) <= max_chunk_bytes:
        if (shift + level) % radix_bits == 0:
            levels.append(level)
        level += 1
    return tuple(levels)


def decompose(first: int, n: int, levels: tuple[int, ...]) -> Iterator[Span]:
    """Cut the run ``[first, first + n)`` into maximal aligned chunks, left to right."""
    end = first + n
    pos = first
    while pos < end:
        size = 1
        for level in reversed(levels):
            size = 1 << level
            if pos % size == 0 and pos + size <= end:
                break
        yield pos, size
        pos += size


def reference_cover(bits: PlugState, nb_blocks: int, levels: tuple[int, ...],
                    cell_blocks: int, coarse: Iterable[int] = ()) -> set[Span]:
    """The cover recomputed from scratch (for tests and checks): each coarse
    cell that holds a plugged block, and the maximal chunks of the plugged
    blocks outside coarse cells."""
    spans: set[Span] = set()
    coarse_set = set(coarse)
    for first, n in bits.plugged_runs(0, nb_blocks):
        pos, end = first, first + n
        while pos < end:
            cell = pos // cell_blocks
            stop = min(end, (cell + 1) * cell_blocks)
            if cell in coarse_set:
                spans.add(_cell_span(cell, cell_blocks, nb_blocks))
            else:
                # extend over following non-coarse cells of the run
                while stop < end and stop // cell_blocks not in coarse_set:
                    stop = min(end, stop + cell_blocks)
                spans.update(decompose(pos, stop - pos, levels))
            pos = stop
    return spans


def _nothing_new(block: int) -> int | None:
    """For ``_cover_new`` when every plugged block is covered already."""
    return None


def _cell_span(cell: int, cell_blocks: int, nb_blocks: int) -> Span:
    first = cell * cell_blocks
    return first, min(cell_blocks, nb_blocks - first)


class CoverPlan:
    """The memslot changes of one step: delete first, then create.

    ``replaces_plugged``: a deleted span still holds blocks that stay plugged
    (a merge, a split, a coarsening), so the guest must not run between the
    delete and the create. ``coarsened`` and ``refined`` are the cells that
    became coarse or returned to exact coverage. (A plain class with slots:
    one is made on every request.)
    """

    __slots__ = ("delete", "create", "replaces_plugged", "coarsened", "refined", "_draft")

    def __init__(self, delete: tuple[Span, ...], create: tuple[Span, ...], replaces_plugged: bool,
                 coarsened: tuple[int, ...], refined: tuple[int, ...], draft: _Draft) -> None:
        self.delete, self.create, self.replaces_plugged = delete, create, replaces_plugged
        self.coarsened, self.refined, self._draft = coarsened, refined, draft


class ExactCover:
    """The current exact cover of one device and the plans that change it."""

    def __init__(self, nb_blocks: int, block_size: int, cell_blocks: int, limit: int,
                 radix_bits: int = RADIX_BITS, max_cells: int = MAX_CHUNK_CELLS) -> None:
        if cell_blocks <= 0 or cell_blocks & (cell_blocks - 1):
            raise ValueError(f"cell_blocks {cell_blocks} is not a power of two")
        if limit < -(-nb_blocks // cell_blocks):
            raise ValueError(f"a limit of {limit} memslots is below one per cell "
                             f"({-(-nb_blocks // cell_blocks)} cells)")
        self.nb_blocks, self.cell_blocks, self.limit = nb_blocks, cell_blocks, limit
        self.levels = chunk_levels(nb_blocks, block_size, radix_bits,
                                   min(MAX_CHUNK_BYTES, max_cells * cell_blocks * block_size))
        self._chunks: dict[int, int] = {}          # first block -> blocks
        self._coarse: dict[int, int] = {}          # coarse cell -> chunks its runs would need
        self._small: dict[int, int] = {}           # cell -> its chunks shorter than a cell
        self._mergeable: set[int] = set()          # cells where a deferred merge is possible
        self._version = 0

    # -- queries -------------------------------------------------------------

    @property
    def count(self) -> int:
        """Memslots the cover holds."""
        return len(self._chunks) + len(self._coarse)

    @property
    def coarse_cells(self) -> frozenset[int]:
        return frozenset(self._coarse)

    @property
    def merge_pending(self) -> bool:
        """Whether deferred plugs left chunks that :meth:`plan_merge` would merge."""
        return bool(self._mergeable)

    def span_at(self, block: int) -> Span | None:
        """The span of the cover holding ``block``, or None."""
        cell = block // self.cell_blocks
        if cell in self._coarse:
            return _cell_span(cell, self.cell_blocks, self.nb_blocks)
        chunks = self._chunks
        for level in self.levels:
            start = block >> level << level
            if chunks.get(start) == 1 << level:
                return start, 1 << level
        return None

    def is_coarse(self, first: int, n: int) -> bool:
        """Whether span ``(first, n)`` is a coarse cell of the cover."""
        cell = first // self.cell_blocks
        return cell in self._coarse and (first, n) == _cell_span(cell, self.cell_blocks,
                                                                  self.nb_blocks)

    def spans(self) -> list[Span]:
        """Every span of the cover, in block order."""
        cells = [_cell_span(c, self.cell_blocks, self.nb_blocks) for c in self._coarse]
        return sorted(list(self._chunks.items()) + cells)

    # -- plans ---------------------------------------------------------------

    def plan_plug(self, bits: PlugState, first: int, n: int, merge: bool = True) -> CoverPlan:
        """Blocks ``[first, first + n)`` were unplugged and are now plugged in
        ``bits``. ``merge=False``: defer merging them with their neighbours
        (see "Deferred merges" above) unless the limit needs it now."""
        if not merge:
            d = _Draft(self)
            self._cover_inside(bits, d, first, first + n)
            if not self._coarse and len(self._chunks) + len(d.added) <= self.limit:
                # the usual case: new chunks only, nothing deleted (no d.plan needed)
                return CoverPlan((), tuple(sorted(d.added.items())), False, (), (), d)
            if d.count() <= self.limit:
                # a plug that completes chunks inside a coarse cell lowers
                # what exact coverage would need: maybe back to exact
                self._maybe_refine(bits, d)
                return d.plan(bits)
        d = _Draft(self)
        self._cover_new(bits, d, first, first + n)
        if not merge and self._mergeable:   # over the limit: merge what was deferred too
            self._merge_mergeable(bits, d)
        self._fit(bits, d)
        self._maybe_refine(bits, d)          # a merge may have made room
        return d.plan(bits)

    def plan_merge(self, bits: PlugState, one_group: bool = False) -> CoverPlan:
        """Merge what deferred plugs left mergeable: the cover becomes the
        maximal chunks again (the same as if every plug had merged).
        ``one_group``: only the lowest group of cells one largest chunk spans
        (8 GiB with 1 GiB cells), so that the guest, stopped while memslots
        over plugged memory are replaced, waits for one group at a time."""
        d = _Draft(self)
        self._merge_mergeable(bits, d, one_group)
        self._maybe_refine(bits, d)
        return d.plan(bits)

    def plan_unplug(self, bits: PlugState, first: int, n: int) -> CoverPlan:
        """Blocks ``[first, first + n)`` were plugged and are now unplugged in ``bits``."""
        d = _Draft(self)
        end, cb = first + n, self.cell_blocks
        pos = first
        while pos < end:
            cell = pos // cb
            if d.is_coarse(cell):
                if bits.any_in_state(cell * cb, min(cb, self.nb_blocks - cell * cb), True):
                    d.set_coarse(cell, self._cell_cost(bits, cell))
                else:
                    d.drop_coarse(cell)
                pos = min(end, (cell + 1) * cb)
                continue
            start, size = self._chunk_containing(d, pos)
            d.remove_chunk(start)
            for run_first, run_n in bits.plugged_runs(start, size):
                for chunk in decompose(run_first, run_n, self.levels):
                    d.add_chunk(*chunk)
            pos = start + size
        if d.count() > self.limit and self._mergeable:    # merge what was deferred first
            self._merge_mergeable(bits, d)
        self._fit(bits, d)
        self._maybe_refine(bits, d)
        return d.plan(bits)

    def plan_clear(self) -> CoverPlan:
        """Everything is unplugged: every span goes."""
        d = _Draft(self)
        for start in list(self._chunks):
            d.remove_chunk(start)
        for cell in list(self._coarse):
            d.drop_coarse(cell)
        d.merged = set(self._mergeable)
        return d.plan(None)

    def commit(self, plan: CoverPlan) -> None:
        """Apply a plan whose memslot changes were made."""
        d = plan._draft
        if d.cover is not self or d.version != self._version:
            raise ValueError("the plan is stale: the cover changed since it was made")
        for start in d.removed:
            self._count_small(start, self._chunks.pop(start), -1)
        for start, size in d.added.items():
            self._chunks[start] = size
            self._count_small(start, size, 1)
        for cell in d.coarse_dropped:
            self._coarse.pop(cell, None)
        self._coarse.update(d.coarse_cost)
        self._mergeable -= d.merged
        self._mergeable.update(d.mergeable)
        self._version += 1

    # -- helpers -------------------------------------------------------------

    def _count_small(self, start: int, size: int, delta: int) -> None:
        if size < self.cell_blocks:
            cell = start // self.cell_blocks
            left = self._small.get(cell, 0) + delta
            if left:
                self._small[cell] = left
            else:
                self._small.pop(cell, None)

    def _chunk_containing(self, d: _Draft, block: int) -> Span:
        for level in self.levels:
            start = block >> level << level
            if d.chunk_at(start) == 1 << level:
                return start, 1 << level
        raise AssertionError(f"block {block} is plugged but no chunk covers it")

    def _free_of_coarse(self, d: _Draft, start: int, size: int) -> bool:
        if not self._coarse and not d.coarse_cost:
            return True
        cb = self.cell_blocks
        first_cell, last_cell = start // cb, (start + size - 1) // cb
        cells = d.coarse_view()
        if last_cell - first_cell + 1 <= len(cells):
            return not any(c in cells for c in range(first_cell, last_cell + 1))
        return not any(first_cell <= c <= last_cell for c in cells)

    def _maximal_chunk(self, bits: PlugState, d: _Draft, block: int) -> Span:
        """The largest allowed chunk containing plugged ``block`` that is fully
        plugged and reaches into no coarse cell."""
        best = (block, 1)
        for level in self.levels[1:]:
            size = 1 << level
            start = block >> level << level
            if start + size > self.nb_blocks or bits.any_in_state(start, size, False) \
                    or not self._free_of_coarse(d, start, size):
                break
            best = (start, size)
        return best

    def _cover_new(self, bits: PlugState, d: _Draft, first: int, end: int,
                   fresh: Callable[[int], int | None] | None = None) -> None:
        """Cover the plugged blocks of ``[first, end)``, which no span covered
        before this plan, by maximal chunks, removing the old chunks those
        swallow. ``fresh(q)`` says where the uncovered stretch holding block
        ``q`` ends (None if ``q`` was covered); by default ``[first, end)``."""
        if fresh is None:
            fresh = lambda q: end if first <= q < end else None     # noqa: E731
        cb = self.cell_blocks
        pos = bits.find(True, first, end)
        while 0 <= pos < end:
            cell = pos // cb
            done = self._find_chunk(d, pos)
            if done is not None:            # covered by a chunk this plan made
                stop = done[0] + done[1]
            elif d.is_coarse(cell):
                d.set_coarse(cell, self._cell_cost(bits, cell))
                stop = (cell + 1) * cb
            else:
                start, size = self._maximal_chunk(bits, d, pos)
                q = start
                while q < start + size:
                    skip = fresh(q)
                    if skip is not None:
                        q = skip
                        continue
                    old = d.chunk_at(q)
                    assert old is not None, f"block {q} is plugged but no chunk starts there"
                    d.remove_chunk(q)
                    q += old
                d.add_chunk(start, size)
                stop = start + size
            pos = bits.find(True, stop, end) if stop < end else -1

    def _cover_inside(self, bits: PlugState, d: _Draft, first: int, end: int) -> None:
        """Cover the new blocks ``[first, end)`` by the maximal chunks inside
        the range (a deferred plug: no old chunk is touched); note the cells
        where one of them could merge with its neighbours."""
        cb = self.cell_blocks
        pos = first
        while pos < end:
            cell = pos // cb
            if d.is_coarse(cell):
                d.set_coarse(cell, self._cell_cost(bits, cell))
                pos = min(end, (cell + 1) * cb)
                continue
            stop = min(end, (cell + 1) * cb)
            while stop < end and not d.is_coarse(stop // cb):
                stop = min(end, stop + cb)
            for start, size in decompose(pos, stop - pos, self.levels):
                d.add_chunk(start, size)
                if self._can_merge(bits, start, size, d):
                    d.mergeable.add(start // cb)
            pos = stop

    def _can_merge(self, bits: PlugState, start: int, size: int, d: _Draft) -> bool:
        """Whether chunk ``(start, size)`` lies in a larger allowed chunk that
        is fully plugged and reaches into no coarse cell (as ``d`` has them)."""
        for level in self.levels:
            bigger = 1 << level
            if bigger > size:
                first = start // bigger * bigger
                return (first + bigger <= self.nb_blocks
                        and not bits.any_in_state(first, bigger, False)
                        and self._free_of_coarse(d, first, bigger))
        return False

    def _merge_mergeable(self, bits: PlugState, d: _Draft, one_group: bool = False) -> None:
        """Replace the chunks of every mergeable cell (or of the lowest group's,
        see :meth:`plan_merge`) by maximal chunks (every plugged block there
        is covered already, by the cover or by ``d``)."""
        cb = self.cell_blocks
        cells = sorted(self._mergeable)
        if one_group and cells:
            group = max(1, (1 << self.levels[-1]) // cb)      # cells of the largest chunk
            cells = [c for c in cells if c // group == cells[0] // group]
        for cell in cells:
            if d.is_coarse(cell):
                continue
            first, n = _cell_span(cell, cb, self.nb_blocks)
            self._cover_new(bits, d, first, first + n, _nothing_new)
        d.merged.update(cells)

    def _find_chunk(self, d: _Draft, block: int) -> Span | None:
        for level in self.levels:
            start = block >> level << level
            if d.added.get(start) == 1 << level:
                return start, 1 << level
        return None

    def _cell_cost(self, bits: PlugState, cell: int) -> int:
        first, n = _cell_span(cell, self.cell_blocks, self.nb_blocks)
        return sum(1 for run in bits.plugged_runs(first, n) for _ in decompose(*run, self.levels))

    def _fit(self, bits: PlugState, d: _Draft) -> None:
        """Coarsen the cells with the most chunks until the limit holds."""
        while d.count() > self.limit:
            small = d.small_view()
            cell = max(small, key=lambda c: small[c], default=None)
            if cell is None or small[cell] < 2:
                raise AssertionError(f"{d.count()} memslots over the limit of {self.limit} "
                                     "and no cell to coarsen")
            cost = 0
            first, n = _cell_span(cell, self.cell_blocks, self.nb_blocks)
            pos = bits.find(True, first, first + n)
            while pos >= 0:
                size = d.chunk_at(pos)
                assert size is not None and size < self.cell_blocks
                d.remove_chunk(pos)
                cost += 1
                pos = bits.find(True, pos + size, first + n) if pos + size < first + n else -1
            d.set_coarse(cell, cost)
            d.coarsened.append(cell)

    def _maybe_refine(self, bits: PlugState, d: _Draft) -> None:
        """Return every coarse cell to exact coverage if the whole cover then
        stays within ``limit - limit // 8`` memslots."""
        coarse = d.coarse_view()
        if not coarse:
            return
        estimate = d.count() - len(coarse) + sum(coarse.values())
        if estimate > self.limit - self.limit // 8:
            return
        cb = self.cell_blocks
        for cell in sorted(coarse):
            d.drop_coarse(cell)
            d.refined.append(cell)
        refined = set(d.refined)

        def fresh(q: int) -> int | None:
            return (q // cb + 1) * cb if q // cb in refined else None

        for cell in d.refined:
            first, n = _cell_span(cell, cb, self.nb_blocks)
            self._cover_new(bits, d, first, first + n, fresh)


class _Draft:
    """A plan being made: changes layered over the cover, applied by commit."""

    def __init__(self, cover: ExactCover) -> None:
        self.cover, self.version = cover, cover._version
        self.removed: dict[int, int] = {}          # old chunks to delete: start -> size
        self.added: dict[int, int] = {}
        self.coarse_cost: dict[int, int] = {}      # coarse cells set or updated
        self.coarse_dropped: set[int] = set()
        self.coarsened: list[int] = []
        self.refined: list[int] = []
        self.mergeable: set[int] = set()           # cells a deferred plug left mergeable
        self.merged: set[int] = set()              # mergeable cells this plan merges

    def chunk_at(self, start: int) -> int | None:
        size = self.added.get(start)
        if size is not None:
            return size
        return None if start in self.removed else self.cover._chunks.get(start)

    def remove_chunk(self, start: int) -> None:
        if self.added.pop(start, None) is None:
            self.removed[start] = self.cover._chunks[start]

    def add_chunk(self, start: int, size: int) -> None:
        self.added[start] = size

    def is_coarse(self, cell: int) -> bool:
        return cell in self.coarse_cost or (cell in self.cover._coarse
                                             and cell not in self.coarse_dropped)

    def set_coarse(self, cell: int, cost: int) -> None:
        self.coarse_dropped.discard(cell)
        self.coarse_cost[cell] = cost

    def drop_coarse(self, cell: int) -> None:
        self.coarse_cost.pop(cell, None)
        if cell in self.cover._coarse:
            self.coarse_dropped.add(cell)

    def coarse_view(self) -> dict[int, int]:
        view = {c: v for c, v in self.cover._coarse.items() if c not in self.coarse_dropped}
        view.update(self.coarse_cost)
        return view

    def small_view(self) -> dict[int, int]:
        """Chunks shorter than a cell, per cell not coarse, with this draft's changes."""
        cb = self.cover.cell_blocks
        view = dict(self.cover._small)
        for start, size in self.removed.items():
            if size < cb:
                view[start // cb] -= 1
        for start, size in self.added.items():
            if size < cb:
                view[start // cb] = view.get(start // cb, 0) + 1
        return {c: v for c, v in view.items() if v and not self.is_coarse(c)}

    def count(self) -> int:
        return (len(self.cover._chunks) - len(self.removed) + len(self.added)
                + len(self.coarse_view()))

    def plan(self, bits: PlugState | None) -> CoverPlan:
        cover = self.cover
        cb, nb = cover.cell_blocks, cover.nb_blocks
        old_cells = {_cell_span(c, cb, nb) for c in cover._coarse if c in self.coarse_dropped}
        new_cells = {_cell_span(c, cb, nb) for c in self.coarse_cost if c not in cover._coarse}
        delete = set(self.removed.items()) | old_cells
        create = set(self.added.items()) | new_cells
        same = delete & create                      # a span deleted and made again: leave it
        delete -= same
        create -= same
        replaces = bits is not None and any(bits.any_in_state(s, n, True) for s, n in delete)
        return CoverPlan(tuple(sorted(delete)), tuple(sorted(create)), replaces,
                         tuple(self.coarsened), tuple(self.refined), self)
