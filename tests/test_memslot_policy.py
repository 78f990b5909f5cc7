"""The memslot policies (kvmmem.devices.memslot_policy) and the plug bitmap (kvmmem.devices.plug_bitmap)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from vmem_helpers import memslots_to_map

from kvmmem.devices.memslot_policy import (
    DynamicPolicy,
    ExactPolicy,
    MemslotChange,
    MemslotMode,
    MemslotPolicy,
    MemslotSpan,
    SinglePolicy,
    UsablePolicy,
    make_policy,
)
from kvmmem.devices.plug_bitmap import PlugBitmap
from kvmmem.devices.virtio_mem_proto import BlockState, usable_region_size

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
BS = 2 * MiB


def policy(mode: str, region: int, memslot: int = GiB, block: int = BS,
           bitmap: PlugBitmap | None = None) -> MemslotPolicy:
    return make_policy(MemslotMode(mode), region, memslot, block,
                       bitmap or PlugBitmap(region // block))


def indices(p: MemslotPolicy, spans: object = None) -> frozenset[int]:
    chosen = p.mapped if spans is None else spans
    return frozenset(s.offset // p.memslot_size for s in chosen)  # type: ignore[attr-defined]


def settle(p: MemslotPolicy, change: MemslotChange) -> MemslotChange:
    p.commit(change)
    return change


def test_modes_have_the_property_names() -> None:
    assert [m.value for m in MemslotMode] == ["single", "usable", "dynamic", "exact"]
    assert MemslotMode("dynamic") is MemslotMode.DYNAMIC
    assert {type(policy(m.value, 4 * GiB)) for m in MemslotMode} == {SinglePolicy, UsablePolicy,
                                                                     DynamicPolicy, ExactPolicy}
    with pytest.raises(ValueError, match="'sparse' is not a valid MemslotMode"):
        policy("sparse", 4 * GiB)


def test_grid_spans_with_a_short_last_memslot() -> None:
    p = policy("usable", 5 * GiB + 2 * MiB)
    assert p.nb_grid == 6
    assert p.grid_span(0) == MemslotSpan(0, GiB)
    assert p.grid_span(4) == MemslotSpan(4 * GiB, GiB)
    assert p.grid_span(5) == MemslotSpan(5 * GiB, 2 * MiB)
    assert list(p.spans())[-1] == MemslotSpan(5 * GiB, 2 * MiB)
    assert p.alias_name(p.grid_span(5)) == "virtio-mem-memslot-5"
    assert list(p.grid_spans(511, 2)) == [MemslotSpan(0, GiB), MemslotSpan(GiB, GiB)]


@pytest.mark.parametrize(("call", "message"), [
    (lambda p: p.grid_span(5), "memslot index 5 is outside 0..4"),
    (lambda p: p.grid_span(-1), "memslot index -1 is outside 0..4"),
    (lambda p: p.grid_span(1.0), "memslot index 1.0 is outside"),
    (lambda p: p.resync(5 * GiB + 1), "usable region size 0x140000001 is outside 0..0x140000000"),
    (lambda p: p.resync(-1), "usable region size -0x1 is outside"),
])
def test_geometry_refusals_change_nothing(call, message: str) -> None:  # type: ignore[no-untyped-def]
    p = policy("usable", 5 * GiB)
    p.commit(p.resync(GiB))
    with pytest.raises(ValueError, match=message):
        call(p)
    assert indices(p) == {0}


def test_memslot_size_must_be_a_block_multiple() -> None:
    with pytest.raises(ValueError, match="memslot size 0x0 must be a positive multiple"):
        policy("usable", 4 * GiB, memslot=0)
    with pytest.raises(ValueError, match="must be a positive multiple of the block size 0x200000"):
        policy("usable", 4 * GiB, memslot=GiB + MiB)


REGION = 500 * GiB


@pytest.mark.parametrize(("requested_gib", "expected"), [(0, 0), (2, 3), (20, 21), (5, 6)])
def test_usable_mode_maps_the_seed_listings(requested_gib: int, expected: int) -> None:
    usable = usable_region_size(REGION, requested_gib * GiB, 2 * MiB)
    p = policy("usable", REGION)
    change = settle(p, p.resync(usable))
    assert indices(p, change.map) == frozenset(range(expected)) == indices(p)
    assert change.unmap == ()
    assert list(change.map) == sorted(change.map)


def test_usable_mode_includes_a_partly_usable_memslot_and_shrinks_on_resync() -> None:
    p = policy("usable", REGION)
    settle(p, p.resync(GiB + 2 * MiB))
    assert indices(p) == {0, 1}
    settle(p, p.resync(REGION))
    assert indices(p) == frozenset(range(500))
    change = settle(p, p.resync(GiB))
    assert indices(p, change.unmap) == frozenset(range(1, 500)) and change.map == ()
    assert p.plug(0, 1) == MemslotChange() and p.unplug(0, 1) == MemslotChange()


def test_single_mode_maps_the_whole_region_always() -> None:
    p = policy("single", REGION)
    assert p.mapped == {MemslotSpan(0, REGION)} and not p.maps_aliases
    assert p.memslot_size == REGION
    for change in (p.resync(0), p.resync(20 * GiB), p.plug(0, 5), p.unplug(0, 5), p.unmap_all()):
        assert not change
    assert p.memslot_at(7 * GiB) == (MemslotSpan(0, REGION), True)


def test_dynamic_mode_maps_memslots_with_plugged_blocks() -> None:
    bitmap = PlugBitmap(REGION // BS)
    p = policy("dynamic", REGION, bitmap=bitmap)
    assert not p.resync(0)
    bitmap.set(512 * 7 + 100, 1, True)
    assert indices(p, settle(p, p.plug(512 * 7 + 100, 1)).map) == {7}
    bitmap.set(512 * 499, 512, True)
    assert indices(p, settle(p, p.plug(512 * 499, 512)).map) == {499}
    assert indices(p) == {7, 499}
    assert not p.resync(20 * GiB)                      # mapped already follows the bitmap
    bitmap.set(512 * 7 + 101, 1, True)
    assert not p.plug(512 * 7 + 101, 1)                # inside a mapped memslot
    bitmap.set(512 * 7 + 100, 1, False)
    assert not p.unplug(512 * 7 + 100, 1)              # memslot 7 still holds a block
    bitmap.set(512 * 7 + 101, 1, False)
    assert indices(p, settle(p, p.unplug(512 * 7 + 101, 1)).unmap) == {7}
    assert p.memslot_at(7 * GiB) == (MemslotSpan(7 * GiB, GiB), False)
    assert p.memslot_at(499 * GiB + 5) == (MemslotSpan(499 * GiB, GiB), True)
    assert indices(p, p.unmap_all().unmap) == {499}


def test_deletes_plugged_tells_a_change_that_unmaps_plugged_memory() -> None:
    bitmap = PlugBitmap(4 * GiB // BS)
    p = policy("usable", 4 * GiB, bitmap=bitmap)
    settle(p, p.resync(4 * GiB))
    bitmap.set(600, 1, True)
    assert p.deletes_plugged(p.resync(GiB))            # memslot 1 holds block 600
    assert not p.deletes_plugged(p.resync(2 * GiB))
    bitmap.set(600, 1, False)
    assert not p.deletes_plugged(p.resync(0))


# --- PlugBitmap ---------------------------------------------------------------------------------

def test_set_counts_only_changed_blocks() -> None:
    bitmap = PlugBitmap(16)
    assert bitmap.set(2, 2, True) == 2
    assert bitmap.set(0, 8, True) == 6
    assert bitmap.count(0, 8) == 8
    assert bitmap.set(4, 8, False) == 4
    assert bitmap.set(4, 8, False) == 0
    assert bitmap.plugged_count == 4


def test_state_and_any_in_state() -> None:
    bitmap = PlugBitmap(32)
    bitmap.set(4, 4, True)
    assert bitmap.state(4, 4) is BlockState.PLUGGED
    assert bitmap.state(0, 4) is BlockState.UNPLUGGED
    assert bitmap.state(3, 2) is BlockState.MIXED
    assert bitmap.any_in_state(0, 5, plugged=True)
    assert not bitmap.any_in_state(0, 4, plugged=True)
    assert bitmap.any_in_state(3, 5, plugged=False)
    assert not bitmap.any_in_state(4, 4, plugged=False)
    assert bitmap.is_plugged(7) and not bitmap.is_plugged(8)


def test_plugged_runs() -> None:
    bitmap = PlugBitmap(32)
    for first, n in [(0, 2), (5, 3), (8, 4), (31, 1)]:
        bitmap.set(first, n, True)
    assert list(bitmap.plugged_runs()) == [(0, 2), (5, 7), (31, 1)]
    assert list(bitmap.plugged_runs(1, 9)) == [(1, 1), (5, 5)]
    assert list(bitmap.plugged_runs(13, 18)) == []


@pytest.mark.parametrize("with_runs", [False, True])
def test_clear_empties_everything(with_runs: bool) -> None:
    bitmap = PlugBitmap(32)
    bitmap.set(3, 1, True)
    bitmap.set(20, 10, True)
    bitmap.clear(list(bitmap.plugged_runs()) if with_runs else None)
    assert bitmap.plugged_count == 0
    assert list(bitmap.plugged_runs()) == []
    assert bitmap.count(0, 32) == 0
    assert bitmap.set(3, 1, True) == 1


@pytest.mark.parametrize(("call", "exc", "message"), [
    (lambda b: b.set(30, 3, True), ValueError, r"block range \[30, 33\) is empty or outside the 32 blocks"),
    (lambda b: b.set(-1, 2, False), ValueError, r"block range \[-1, 1\) is empty or outside"),
    (lambda b: b.set(3, 0, True), ValueError, r"block range \[3, 3\) is empty"),
    (lambda b: b.state(0, 33), ValueError, "outside the 32 blocks"),
    (lambda b: b.is_plugged(32), ValueError, "outside the 32 blocks"),
    (lambda b: b.any_in_state(31, 2, True), ValueError, "outside the 32 blocks"),
    (lambda b: list(b.plugged_runs(0, 40)), ValueError, "outside the 32 blocks"),
    (lambda b: b.count(30, 4), ValueError, "outside the 32 blocks"),
    (lambda b: b.set(1.0, 1, True), TypeError, "first must be an int, not float"),
])
def test_bitmap_refusals_change_nothing(call, exc: type[Exception], message: str) -> None:  # type: ignore[no-untyped-def]
    bitmap = PlugBitmap(32)
    bitmap.set(5, 6, True)
    with pytest.raises(exc, match=message):
        call(bitmap)
    assert list(bitmap.plugged_runs()) == [(5, 6)]
    assert bitmap.plugged_count == 6


def test_bitmap_refuses_bad_geometry() -> None:
    with pytest.raises(ValueError, match="nb_blocks 0 must be positive"):
        PlugBitmap(0)
    with pytest.raises(TypeError, match="nb_blocks must be an int"):
        PlugBitmap(8.0)  # type: ignore[arg-type]


def test_64t_device_with_2m_blocks() -> None:
    region = 64 * TiB
    bitmap = PlugBitmap(region // BS)
    nb_blocks = bitmap.nb_blocks
    p = policy("dynamic", region, bitmap=bitmap)
    assert p.nb_grid == 64 * 1024
    last = p.nb_grid - 1
    bitmap.set(nb_blocks - 3, 3, True)
    assert indices(p, settle(p, p.plug(nb_blocks - 3, 3)).map) == {last}
    assert bitmap.state(nb_blocks - 4, 4) is BlockState.MIXED
    bitmap.set(nb_blocks - 3, 3, False)
    assert indices(p, settle(p, p.unplug(nb_blocks - 3, 3)).unmap) == {last}
    assert bitmap.plugged_count == 0 and p.mapped == frozenset()


class DynamicPolicyModel(RuleBasedStateMachine):
    """Bitmap and dynamic policy against a plain set of plugged block indices."""

    @initialize(nb_blocks=st.integers(1, 96), per_slot=st.integers(1, 20))
    def setup(self, nb_blocks: int, per_slot: int) -> None:
        self.bitmap = PlugBitmap(nb_blocks)
        self.policy = policy("dynamic", nb_blocks * BS, per_slot * BS, bitmap=self.bitmap)
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
        self.bitmap.set(first, n, True)
        change = settle(self.policy, self.policy.plug(first, n))
        assert change.unmap == ()
        assert sorted(indices(self.policy, change.map)) == sorted(self._populated() - before)

    @rule(data=st.data())
    def unplug(self, data: st.DataObject) -> None:
        first, n = self._range(data)
        before = self._populated()
        self.plugged -= set(range(first, first + n))
        self.bitmap.set(first, n, False)
        change = settle(self.policy, self.policy.unplug(first, n))
        assert change.map == ()
        assert sorted(indices(self.policy, change.unmap)) == sorted(before - self._populated())

    @rule()
    def clear(self) -> None:
        before = self._populated()
        self.plugged.clear()
        self.bitmap.clear()
        change = settle(self.policy, self.policy.resync(0))
        assert sorted(indices(self.policy, change.unmap)) == sorted(before)

    @rule(data=st.data())
    def queries(self, data: st.DataObject) -> None:
        first, n = self._range(data)
        blocks = set(range(first, first + n))
        inside = blocks & self.plugged
        expected = (BlockState.PLUGGED if inside == blocks else
                    BlockState.UNPLUGGED if not inside else BlockState.MIXED)
        assert self.bitmap.state(first, n) is expected
        assert self.bitmap.count(first, n) == len(inside)
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
        assert indices(self.policy) == self._populated()
        assert not self.policy.resync(0)                     # nothing left to correct
        assert all(self.bitmap.is_plugged(b) == (b in self.plugged) for b in range(self.nb_blocks))


TestDynamicPolicyModel = DynamicPolicyModel.TestCase
TestDynamicPolicyModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@given(st.integers(1, 64), st.integers(1, 64), st.data())
def test_dynamic_memslots_follow_the_bitmap(nb_memslots: int, per_slot: int, data: st.DataObject) -> None:
    region = nb_memslots * per_slot * BS
    bitmap = PlugBitmap(region // BS)
    plugged = data.draw(st.sets(st.integers(0, bitmap.nb_blocks - 1), max_size=40))
    for b in plugged:
        bitmap.set(b, 1, True)
    p = policy("dynamic", region, per_slot * BS, bitmap=bitmap)
    settle(p, p.resync(region))
    assert indices(p) == {b // per_slot for b in plugged}
    assert memslots_to_map("dynamic", per_slot * BS, region, region, bitmap) == indices(p)
