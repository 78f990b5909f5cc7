"""The cover of ``memslots=exact`` (kvmmem.devices.exact_cover), without KVM."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.devices.exact_cover import CoverPlan, ExactCover, chunk_levels, decompose, reference_cover
from kvmmem.devices.plug_bitmap import PlugBitmap

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
BLOCK = 2 * MiB
STEP = 128 * MiB // BLOCK           # Linux's memory block: 64 blocks


class Device:
    """A bitmap and its cover, stepped the way the device steps them."""

    def __init__(self, size: int, cell: int = GiB, limit: int | None = None,
                 radix_bits: int = 3, merge: bool = True) -> None:
        self.merge = merge                      # False: plugs defer their merges
        self.nb = size // BLOCK
        self.cell_blocks = cell // BLOCK
        self.bits = PlugBitmap(self.nb)
        cells = -(-self.nb // self.cell_blocks)
        self.cover = ExactCover(self.nb, BLOCK, self.cell_blocks, limit or cells, radix_bits)
        self.spans = set(self.cover.spans())
        self.plans: list[CoverPlan] = []

    def plug(self, first: int, n: int) -> CoverPlan:
        before = self._plugged()
        self.bits.set(first, n, True)
        return self._apply(self.cover.plan_plug(self.bits, first, n, self.merge), before)

    def merge_now(self) -> CoverPlan:
        before = self._plugged()
        return self._apply(self.cover.plan_merge(self.bits), before)

    def unplug(self, first: int, n: int) -> CoverPlan:
        before = self._plugged()
        self.bits.set(first, n, False)
        return self._apply(self.cover.plan_unplug(self.bits, first, n), before)

    def clear(self) -> CoverPlan:
        before = self._plugged()
        self.bits.clear()
        return self._apply(self.cover.plan_clear(), before)

    def _plugged(self) -> set[int]:
        return {b for first, n in self.bits.plugged_runs() for b in range(first, first + n)}

    def _apply(self, plan: CoverPlan, before: set[int]) -> CoverPlan:
        assert set(plan.delete) <= self.spans, "deletes a span that is not there"
        assert not set(plan.create) & (self.spans - set(plan.delete)), "creates a span twice"
        after = self._plugged()
        kept = before & after
        assert plan.replaces_plugged == any(b in kept for s, n in plan.delete
                                            for b in range(s, s + n))
        self.cover.commit(plan)
        self.spans = (self.spans - set(plan.delete)) | set(plan.create)
        assert self.spans == set(self.cover.spans())
        self.plans.append(plan)
        return plan

    def check_unmerged(self) -> None:
        """Merges may be pending: aligned allowed chunks, fully plugged, outside
        coarse cells, not overlapping, over every plugged block; within the limit."""
        cover, cb = self.cover, self.cell_blocks
        assert cover.count == len(self.spans) <= cover.limit
        coarse = {(c * cb, min(cb, self.nb - c * cb)) for c in cover.coarse_cells}
        covered: list[int] = []
        for start, n in self.spans - coarse:
            assert n.bit_length() - 1 in cover.levels and start % n == 0, (start, n)
            assert not self.bits.any_in_state(start, n, False), (start, n)
            assert not {b // cb for b in (start, start + n - 1)} & cover.coarse_cells
            covered.extend(range(start, start + n))
        assert len(covered) == len(set(covered))
        coarse_blocks = {b for s, n in coarse for b in range(s, s + n)}
        assert self._plugged() - coarse_blocks == set(covered)

    def check(self) -> None:
        """The cover is the reference cover, within the limit, coarse only where needed."""
        cover = self.cover
        assert not cover.merge_pending
        assert self.spans == reference_cover(self.bits, self.nb, cover.levels, self.cell_blocks,
                                             cover.coarse_cells)
        assert cover.count == len(self.spans) <= cover.limit
        cb = self.cell_blocks
        for cell in cover.coarse_cells:
            assert self.bits.any_in_state(cell * cb, min(cb, self.nb - cell * cb), True)
        if cover.coarse_cells:          # coarse only while exact would not fit the low water
            assert _cell_estimate(self) > cover.limit - cover.limit // 8
        covered = {b for s, n in self.spans for b in range(s, s + n)}
        plugged = self._plugged()
        assert plugged <= covered
        coarse_blocks = {b for c in cover.coarse_cells for b in range(c * cb, min((c + 1) * cb, self.nb))}
        assert covered - plugged <= coarse_blocks, "a chunk covers an unplugged block"


def _cell_estimate(dev: Device) -> int:
    """Exact chunks plus, per coarse cell, the chunks of its own runs."""
    cover, cb = dev.cover, dev.cell_blocks
    chunks = [s for s in dev.spans if s not in
              {(c * cb, min(cb, dev.nb - c * cb)) for c in cover.coarse_cells}]
    cost = 0
    for c in cover.coarse_cells:
        first = c * cb
        cost += sum(1 for run in dev.bits.plugged_runs(first, min(cb, dev.nb - first))
                    for _ in decompose(*run, cover.levels))
    return len(chunks) + cost


def test_levels_are_the_block_and_powers_of_eight_bytes() -> None:
    assert chunk_levels(TiB // BLOCK, BLOCK) == (0, 3, 6, 9, 12, 15, 18)   # 2M, 16M ... 512G
    assert chunk_levels(GiB // (4 * MiB), 4 * MiB) == (0, 2, 5, 8)          # 4M, 16M, 128M, 1G
    assert chunk_levels(TiB // BLOCK, BLOCK, radix_bits=1) == tuple(range(20))
    assert chunk_levels(64 * TiB // BLOCK, BLOCK)[-1] == 21                  # 4 TiB at most
    assert ExactCover(TiB // BLOCK, BLOCK, GiB // BLOCK, 1024).levels[-1] == 12   # 8 cells: 8 GiB
    with pytest.raises(ValueError, match="not a power of two"):
        chunk_levels(10, 3 * MiB)


def test_decompose_cuts_a_run_into_aligned_chunks() -> None:
    levels = (0, 3, 6)
    assert list(decompose(0, 64, levels)) == [(0, 64)]
    assert list(decompose(5, 12, levels)) == [(5, 1), (6, 1), (7, 1), (8, 8), (16, 1)]
    assert list(decompose(0, 63, levels)) == [(i * 8, 8) for i in range(7)] + [(56 + i, 1) for i in range(7)]


def test_linux_steps_to_64_gib_leave_one_memslot() -> None:
    dev = Device(TiB)
    worst = 0
    for k in range(512):
        dev.plug(k * STEP, STEP)
        worst = max(worst, dev.cover.count)
        if k % 37 == 0 or k == 511:
            dev.check()
    eight_gib = 8 * GiB // BLOCK                 # chunks stop at 8 cells of 1 GiB
    assert dev.spans == {(i * eight_gib, eight_gib) for i in range(8)}
    assert worst <= 3 * 7
    # every 128 MiB request deletes and creates a bounded number of memslots
    assert max(len(p.delete) + len(p.create) for p in dev.plans) <= 3 * 7 + 1
    # and unplugged from the top again, the count stays as small
    for k in reversed(range(512)):
        dev.unplug(k * STEP, STEP)
        assert dev.cover.count <= 3 * 7
    assert dev.spans == set()


def test_deferred_linux_steps_merge_once_into_8_gib() -> None:
    """64 GiB in 128 MiB steps with merges deferred: one memslot per step and
    nothing else on the request path; one merge makes 8 memslots of 8 GiB,
    each byte in a memslot twice (128 MiB, then 8 GiB) instead of three times."""
    dev = Device(TiB, merge=False)
    for k in range(512):
        plan = dev.plug(k * STEP, STEP)
        assert plan.create == ((k * STEP, STEP),) and not plan.delete
        assert dev.cover.merge_pending == (k % 8 == 7 or k > 7)
    dev.check_unmerged()
    assert dev.cover.count == 512
    plan = dev.merge_now()
    eight_gib = 8 * GiB // BLOCK
    assert set(plan.create) == {(i * eight_gib, eight_gib) for i in range(8)}
    assert len(plan.delete) == 512 and plan.replaces_plugged
    dev.check()
    assert dev.merge_now().create == ()                  # nothing left to merge


def test_a_deferred_merge_can_go_one_group_at_a_time() -> None:
    """16 GiB plugged without merging: two groups of eight 1 GiB cells; one
    group per plan, lowest first, until nothing is pending."""
    dev = Device(TiB, merge=False)
    for k in range(128):
        dev.plug(k * STEP, STEP)
    eight_gib = 8 * GiB // BLOCK
    dev.cover.commit(plan := dev.cover.plan_merge(dev.bits, one_group=True))
    dev.spans = (dev.spans - set(plan.delete)) | set(plan.create)
    assert plan.create == ((0, eight_gib),) and len(plan.delete) == 64
    assert dev.cover.merge_pending
    dev.check_unmerged()
    plan = dev.merge_now()                   # the rest at once
    assert plan.create == ((eight_gib, eight_gib),)
    dev.check()


def test_a_deferred_merge_after_a_hole_merges_around_it() -> None:
    dev = Device(TiB, merge=False)
    for k in range(8):
        dev.plug(k * STEP, STEP)
    dev.unplug(20, 1)                        # splits the 128 MiB chunk holding block 20
    dev.check_unmerged()
    dev.merge_now()
    dev.check()
    assert (0, 8 * STEP) not in dev.spans and dev.cover.count == 14 + 7


def test_scattered_blocks_are_one_memslot_each() -> None:
    dev = Device(TiB)
    for gib in range(512):
        plan = dev.plug(gib * GiB // BLOCK + 7, 1)
        assert plan.create == ((gib * GiB // BLOCK + 7, 1),) and not plan.delete
    dev.check()
    assert dev.cover.count == 512


def test_eight_neighbours_merge_and_a_hole_splits() -> None:
    dev = Device(TiB)
    for i in range(7):
        dev.plug(i * 8, 8)
    plan = dev.plug(56, 8)
    assert plan.create == ((0, 64),) and len(plan.delete) == 7 and plan.replaces_plugged
    plan = dev.unplug(20, 1)
    assert plan.delete == ((0, 64),) and plan.replaces_plugged
    assert set(plan.create) == {(0, 8), (8, 8), (16, 1), (17, 1), (18, 1), (19, 1), (21, 1),
                                (22, 1), (23, 1), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8)}
    dev.check()


def test_unplugging_a_whole_chunk_replaces_nothing_plugged() -> None:
    dev = Device(TiB)
    dev.plug(0, 8)
    dev.plug(64, 1)
    plan = dev.unplug(0, 8)
    assert plan.delete == ((0, 8),) and not plan.create and not plan.replaces_plugged


def test_middle_block_of_64_gib() -> None:
    dev = Device(TiB)
    n = 64 * GiB // BLOCK
    dev.plug(0, n)
    assert dev.spans == {(i * n // 8, n // 8) for i in range(8)}
    dev.unplug(n // 2, 1)
    dev.check()
    # left: 4 x 8 GiB; right: 7 x 2 MiB, 7 x 16 MiB, 7 x 128 MiB, 7 x 1 GiB, 3 x 8 GiB
    assert dev.cover.count == 4 + 7 * 4 + 3
    assert sum(n for _, n in dev.spans) == n - 1


def test_fallback_coarsens_cells_and_returns() -> None:
    # 4 GiB device, cells of 1 GiB: at most 4 memslots
    dev = Device(4 * GiB)
    assert dev.cover.limit == 4
    dev.plug(0, 1)
    dev.plug(2, 1)
    dev.plug(600, 1)
    dev.plug(1100, 1)
    dev.check()
    assert dev.cover.coarse_cells == frozenset()
    plan = dev.plug(4, 1)                          # a fifth memslot: cell 0 has the most
    assert plan.coarsened == (0,) and dev.cover.coarse_cells == {0}
    assert (0, 512) in plan.create and plan.replaces_plugged
    dev.check()
    dev.plug(6, 1)                                 # inside the coarse cell: nothing to do
    assert not dev.plans[-1].delete and not dev.plans[-1].create
    dev.unplug(2, 1)
    assert dev.cover.coarse_cells == {0}           # exact: 3 chunks in cell 0 + 2 = 5 > 4
    dev.check()
    plan = dev.unplug(4, 1)                        # exact: 2 + 2 = 4, within the limit
    assert plan.refined == (0,) and dev.cover.coarse_cells == frozenset()
    assert plan.delete == ((0, 512),) and plan.create == ((0, 1), (6, 1)) and plan.replaces_plugged
    dev.check()


def test_a_coarse_cell_that_empties_is_dropped() -> None:
    dev = Device(2 * GiB, limit=2)
    dev.plug(0, 3)
    dev.plug(600, 1)
    assert dev.cover.coarse_cells == {0}
    plan = dev.unplug(0, 3)
    assert plan.delete == ((0, 512),) and not plan.replaces_plugged
    dev.check()


def test_stale_plans_are_refused() -> None:
    dev = Device(GiB)
    dev.bits.set(0, 1, True)
    plan = dev.cover.plan_plug(dev.bits, 0, 1)
    dev.cover.commit(plan)
    with pytest.raises(ValueError, match="stale"):
        dev.cover.commit(plan)


def test_the_limit_must_allow_one_memslot_per_cell() -> None:
    with pytest.raises(ValueError, match="below one per cell"):
        ExactCover(2048, BLOCK, 512, 3)


def test_clear_deletes_everything() -> None:
    dev = Device(GiB)
    dev.plug(3, 40)
    plan = dev.clear()
    assert not plan.create and not plan.replaces_plugged and dev.spans == set()


# -- random streams -------------------------------------------------------------

NB = 256                  # 512 MiB of 2 MiB blocks: chunks of 1, 8, 64 blocks, cells of 16 blocks
CELL = 16

ops = st.lists(st.tuples(st.sampled_from(["plug", "unplug", "clear", "merge"]),
                         st.integers(0, NB - 1), st.integers(1, 40)), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=ops, limit=st.sampled_from([16, 17, 20, 64]), merge=st.booleans())
def test_random_streams_keep_the_cover_exact(steps: list[tuple[str, int, int]], limit: int,
                                             merge: bool) -> None:
    """Merging on every plug, or deferring merges (a "merge" step runs them)."""
    dev = Device(NB * BLOCK, cell=CELL * BLOCK, limit=limit, merge=merge)
    for kind, first, n in steps:
        n = min(n, NB - first)
        if kind == "merge":
            if merge:
                continue
            dev.merge_now()
        elif kind == "clear":
            dev.clear()
        elif kind == "plug":
            gap = dev.bits.find(True, first, first + n)     # plug up to the next plugged block
            n = (gap if gap >= 0 else first + n) - first
            if n:
                dev.plug(first, n)
        else:
            gap = dev.bits.find(False, first, first + n)
            n = (gap if gap >= 0 else first + n) - first
            if n:
                dev.unplug(first, n)
        if dev.cover.merge_pending:
            dev.check_unmerged()
        else:
            dev.check()
    if dev.cover.merge_pending:
        dev.merge_now()
        dev.check()
