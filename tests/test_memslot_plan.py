"""Memslot planning and the plug bitmap (kvmmem.devices.memslot_plan)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from kvmmem.devices.memslot_plan import (
    MemslotChanges, MemslotMode, PlugBitmap, memslot_count, memslot_span, memslots_to_map, plan_changes)
from kvmmem.devices.virtio_mem_proto import BlockState, usable_region_size

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40


def test_modes_have_the_property_names() -> None:
    assert [m.value for m in MemslotMode] == ["single", "usable", "dynamic"]
    assert MemslotMode("dynamic") is MemslotMode.DYNAMIC


def test_memslot_count_and_span_with_a_short_last_memslot() -> None:
    assert memslot_count(GiB, 500 * GiB) == 500
    assert memslot_count(GiB, 5 * GiB + 2 * MiB) == 6
    assert memslot_span(0, GiB, 5 * GiB + 2 * MiB) == (0, GiB)
    assert memslot_span(4, GiB, 5 * GiB + 2 * MiB) == (4 * GiB, GiB)
    assert memslot_span(5, GiB, 5 * GiB + 2 * MiB) == (5 * GiB, 2 * MiB)


@pytest.mark.parametrize(("call", "exc", "message"), [
    (lambda: memslot_count(0, GiB), ValueError, "memslot size 0x0 and region size 0x40000000 must be positive"),
    (lambda: memslot_count(GiB, -1), ValueError, "must be positive"),
    (lambda: memslot_span(5, GiB, 5 * GiB), ValueError, "memslot index 5 is outside 0..4"),
    (lambda: memslot_span(-1, GiB, 5 * GiB), ValueError, "memslot index -1 is outside 0..4"),
    (lambda: memslot_count(1.0, GiB), TypeError, "memslot_size must be an int, not float"),
])
def test_geometry_refusals(call, exc: type[Exception], message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc, match=message):
        call()


REGION = 500 * GiB


@pytest.mark.parametrize(("requested_gib", "expected"), [(0, 0), (2, 3), (20, 21), (5, 6)])
def test_usable_mode_maps_the_seed_listings(requested_gib: int, expected: int) -> None:
    usable = usable_region_size(REGION, requested_gib * GiB, 2 * MiB)
    assert memslots_to_map(MemslotMode.USABLE, GiB, REGION, usable) == frozenset(range(expected))


def test_usable_mode_includes_a_partly_usable_memslot() -> None:
    assert memslots_to_map("usable", GiB, REGION, GiB + 2 * MiB) == {0, 1}
    assert memslots_to_map("usable", GiB, REGION, REGION) == frozenset(range(500))


def test_single_mode_maps_the_whole_region_always() -> None:
    assert memslots_to_map(MemslotMode.SINGLE, REGION, REGION, 0) == {0}
    assert memslots_to_map(MemslotMode.SINGLE, GiB, REGION, 20 * GiB) == {0}


def test_dynamic_mode_maps_memslots_with_plugged_blocks() -> None:
    bitmap = PlugBitmap(REGION // (2 * MiB), GiB // (2 * MiB))
    assert memslots_to_map(MemslotMode.DYNAMIC, GiB, REGION, 0, bitmap) == frozenset()
    bitmap.plug(512 * 7 + 100, 1)
    bitmap.plug(512 * 499, 512)
    assert memslots_to_map(MemslotMode.DYNAMIC, GiB, REGION, 20 * GiB, bitmap) == {7, 499}


@pytest.mark.parametrize(("args", "message"), [
    (("dynamic", GiB, REGION, 0, None), "dynamic mode needs the plug bitmap"),
    (("dynamic", 2 * GiB, REGION, 0, PlugBitmap(REGION // (2 * MiB), 512)),
     r"bitmap of 256000 blocks, 512 per memslot, does not match region size 0x7d00000000 and memslot size "
     r"0x80000000"),
    (("dynamic", GiB, 2 * REGION, 0, PlugBitmap(REGION // (2 * MiB), 512)), "does not match region size"),
    (("usable", GiB, REGION, REGION + GiB, None), "usable region size 0x7d40000000 is outside 0..0x7d00000000"),
    (("usable", GiB, REGION, -1, None), "usable region size -0x1 is outside"),
    (("sparse", GiB, REGION, 0, None), "'sparse' is not a valid MemslotMode"),
])
def test_memslots_to_map_refusals(args: tuple, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        memslots_to_map(*args)


def test_plan_changes_unmaps_and_maps_sorted() -> None:
    changes = plan_changes({0, 1, 2, 9}, {2, 3, 0, 5})
    assert changes == MemslotChanges(unmap=(1, 9), map=(3, 5))
    assert plan_changes({1}, {1}) == MemslotChanges((), ())


# --- PlugBitmap ---------------------------------------------------------------------------------

def test_plug_reports_memslots_that_become_populated() -> None:
    bitmap = PlugBitmap(40, 8)
    assert bitmap.nb_memslots == 5
    assert bitmap.plug(6, 4) == (0, 1)
    assert bitmap.plug(10, 1) == ()
    assert bitmap.plug(0, 1) == ()
    assert bitmap.plugged_count == 6
    assert [bitmap.memslot_plugged(i) for i in range(5)] == [3, 3, 0, 0, 0]
    assert bitmap.populated_memslots() == {0, 1}


def test_unplug_reports_memslots_that_become_empty() -> None:
    bitmap = PlugBitmap(40, 8)
    bitmap.plug(6, 12)
    assert bitmap.unplug(6, 2) == (0,)
    assert bitmap.unplug(8, 4) == ()
    assert bitmap.unplug(12, 6) == (1, 2)
    assert bitmap.plugged_count == 0
    assert bitmap.populated_memslots() == frozenset()


def test_plug_and_unplug_count_only_changed_blocks() -> None:
    bitmap = PlugBitmap(16, 8)
    bitmap.plug(2, 2)
    assert bitmap.plug(0, 8) == ()
    assert bitmap.memslot_plugged(0) == 8
    assert bitmap.unplug(4, 8) == ()
    assert bitmap.unplug(4, 8) == ()
    assert bitmap.plugged_count == 4


def test_short_last_memslot() -> None:
    bitmap = PlugBitmap(10, 4)
    assert bitmap.nb_memslots == 3
    assert bitmap.memslot_blocks(2) == (8, 2)
    assert bitmap.plug(8, 2) == (2,)
    assert bitmap.memslot_plugged(2) == 2


def test_state_and_any_in_state() -> None:
    bitmap = PlugBitmap(32, 8)
    bitmap.plug(4, 4)
    assert bitmap.state(4, 4) is BlockState.PLUGGED
    assert bitmap.state(0, 4) is BlockState.UNPLUGGED
    assert bitmap.state(3, 2) is BlockState.MIXED
    assert bitmap.any_in_state(0, 5, plugged=True)
    assert not bitmap.any_in_state(0, 4, plugged=True)
    assert bitmap.any_in_state(3, 5, plugged=False)
    assert not bitmap.any_in_state(4, 4, plugged=False)
    assert bitmap.is_plugged(7) and not bitmap.is_plugged(8)


def test_plugged_runs() -> None:
    bitmap = PlugBitmap(32, 8)
    for first, n in [(0, 2), (5, 3), (8, 4), (31, 1)]:
        bitmap.plug(first, n)
    assert list(bitmap.plugged_runs()) == [(0, 2), (5, 7), (31, 1)]
    assert list(bitmap.plugged_runs(1, 9)) == [(1, 1), (5, 5)]
    assert list(bitmap.plugged_runs(13, 18)) == []


def test_clear_empties_everything_and_reports_it() -> None:
    bitmap = PlugBitmap(32, 8)
    bitmap.plug(3, 1)
    bitmap.plug(20, 10)
    assert bitmap.clear() == (0, 2, 3)
    assert bitmap.plugged_count == 0
    assert list(bitmap.plugged_runs()) == []
    assert [bitmap.memslot_plugged(i) for i in range(4)] == [0, 0, 0, 0]
    assert bitmap.clear() == ()
    assert bitmap.plug(3, 1) == (0,)


@pytest.mark.parametrize(("call", "exc", "message"), [
    (lambda b: b.plug(30, 3), ValueError, r"block range \[30, 33\) is empty or outside the 32 blocks"),
    (lambda b: b.unplug(-1, 2), ValueError, r"block range \[-1, 1\) is empty or outside"),
    (lambda b: b.plug(3, 0), ValueError, r"block range \[3, 3\) is empty"),
    (lambda b: b.state(0, 33), ValueError, "outside the 32 blocks"),
    (lambda b: b.is_plugged(32), ValueError, "outside the 32 blocks"),
    (lambda b: b.any_in_state(31, 2, True), ValueError, "outside the 32 blocks"),
    (lambda b: list(b.plugged_runs(0, 40)), ValueError, "outside the 32 blocks"),
    (lambda b: b.memslot_plugged(4), ValueError, "memslot index 4 is outside 0..3"),
    (lambda b: b.plug(1.0, 1), TypeError, "first must be an int, not float"),
])
def test_bitmap_refusals_change_nothing(call, exc: type[Exception], message: str) -> None:  # type: ignore[no-untyped-def]
    bitmap = PlugBitmap(32, 8)
    bitmap.plug(5, 6)
    with pytest.raises(exc, match=message):
        call(bitmap)
    assert list(bitmap.plugged_runs()) == [(5, 6)]
    assert bitmap.plugged_count == 6
    assert [bitmap.memslot_plugged(i) for i in range(4)] == [3, 3, 0, 0]


def test_bitmap_refuses_bad_geometry() -> None:
    with pytest.raises(ValueError, match="nb_blocks 0 and blocks_per_memslot 8 must be positive"):
        PlugBitmap(0, 8)
    with pytest.raises(ValueError, match="must be positive"):
        PlugBitmap(8, 0)


def test_64t_device_with_2m_blocks() -> None:
    nb_blocks = 64 * TiB // (2 * MiB)
    bitmap = PlugBitmap(nb_blocks, GiB // (2 * MiB))
    assert bitmap.nb_memslots == 64 * 1024
    last = bitmap.nb_memslots - 1
    assert bitmap.plug(nb_blocks - 3, 3) == (last,)
    assert bitmap.state(nb_blocks - 4, 4) is BlockState.MIXED
    assert bitmap.populated_memslots() == {last}
    assert bitmap.unplug(nb_blocks - 3, 3) == (last,)
    assert bitmap.plugged_count == 0


class PlugBitmapModel(RuleBasedStateMachine):
    """PlugBitmap against a plain set of plugged block indices."""

    @initialize(nb_blocks=st.integers(1, 96), per_slot=st.integers(1, 20))
    def setup(self, nb_blocks: int, per_slot: int) -> None:
        self.bitmap = PlugBitmap(nb_blocks, per_slot)
        self.nb_blocks = nb_blocks
        self.per_slot = per_slot
        self.plugged: set[int] = set()

    def _populated(self) -> set[int]:
        return {b // self.per_slot for b in self.plugged}

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        first = data.draw(st.integers(0, self.nb_blocks - 1))
        return first, data.draw(st.integers(1, self.nb_blocks - first))

    @rule(data=st.data())
    def plug(self, data: st.DataObject) -> None:
        first, n = self._range(data)
        before = self._populated()
        self.plugged |= set(range(first, first + n))
        assert self.bitmap.plug(first, n) == tuple(sorted(self._populated() - before))

    @rule(data=st.data())
    def unplug(self, data: st.DataObject) -> None:
        first, n = self._range(data)
        before = self._populated()
        self.plugged -= set(range(first, first + n))
        assert self.bitmap.unplug(first, n) == tuple(sorted(before - self._populated()))

    @rule()
    def clear(self) -> None:
        before = self._populated()
        self.plugged.clear()
        assert self.bitmap.clear() == tuple(sorted(before))

    @rule(data=st.data())
    def queries(self, data: st.DataObject) -> None:
        first, n = self._range(data)
        blocks = set(range(first, first + n))
        inside = blocks & self.plugged
        expected = (BlockState.PLUGGED if inside == blocks else
                    BlockState.UNPLUGGED if not inside else BlockState.MIXED)
        assert self.bitmap.state(first, n) is expected
        assert self.bitmap.any_in_state(first, n, plugged=True) == bool(inside)
        assert self.bitmap.any_in_state(first, n, plugged=False) == (inside != blocks)
        runs = list(self.bitmap.plugged_runs(first, n))
        covered = [b for start, length in runs for b in range(start, start + length)]
        assert covered == sorted(inside)
        assert all(a[0] + a[1] < b[0] for a, b in zip(runs, runs[1:]))

    @invariant()
    def counters_match(self) -> None:
        if not hasattr(self, "bitmap"):
            return
        assert self.bitmap.plugged_count == len(self.plugged)
        assert self.bitmap.populated_memslots() == self._populated()
        for index in range(self.bitmap.nb_memslots):
            lo, count = self.bitmap.memslot_blocks(index)
            expected = len(self.plugged & set(range(lo, lo + count)))
            assert self.bitmap.memslot_plugged(index) == expected
        assert all(self.bitmap.is_plugged(b) == (b in self.plugged) for b in range(self.nb_blocks))


TestPlugBitmapModel = PlugBitmapModel.TestCase
TestPlugBitmapModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@given(st.integers(1, 64), st.integers(1, 64), st.data())
def test_dynamic_memslots_follow_the_bitmap(nb_memslots: int, per_slot: int, data: st.DataObject) -> None:
    block = 2 * MiB
    region = nb_memslots * per_slot * block
    bitmap = PlugBitmap(region // block, per_slot)
    plugged = data.draw(st.sets(st.integers(0, bitmap.nb_blocks - 1), max_size=40))
    for b in plugged:
        bitmap.plug(b, 1)
    wanted = memslots_to_map("dynamic", per_slot * block, region, region, bitmap)
    assert wanted == {b // per_slot for b in plugged}
