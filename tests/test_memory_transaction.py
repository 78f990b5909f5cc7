"""Transactions, listeners and rollback (kvmmem.memory.address_space), without KVM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.memory import (
    AddressSpace,
    FlatRange,
    HostMemory,
    MemoryListener,
    MemoryRegion,
    UnassignedAccessError,
    begin,
    commit,
    memory_transaction,
    transaction_depth,
)
from kvmmem.memory.flatview import render, simplify

MiB = 1 << 20


class Recorder(MemoryListener):
    """Records every call; keeps the set of ranges it was told exist; refuses any range
    at ``refuse_start`` it has not held before (so restoring an old range succeeds)."""

    def __init__(self, refuse_start: int | None = None) -> None:
        self.calls: list[tuple[str, int | None]] = []
        self.live: dict[int, FlatRange] = {}
        self.refuse_start = refuse_start
        self.seen: set[FlatRange] = set()

    def begin(self) -> None:
        self.calls.append(("begin", None))

    def commit(self) -> None:
        self.calls.append(("commit", None))

    def region_add(self, fr: FlatRange) -> None:
        if fr.start == self.refuse_start and fr not in self.seen:
            raise OSError(17, "refused by test listener")
        assert fr.start not in self.live
        self.seen.add(fr)
        self.live[fr.start] = fr
        self.calls.append(("add", fr.start))

    def region_del(self, fr: FlatRange) -> None:
        assert self.live.pop(fr.start) == fr
        self.calls.append(("del", fr.start))


@pytest.fixture(autouse=True)
def no_open_transaction() -> Iterator[None]:
    assert transaction_depth() == 0
    yield
    assert transaction_depth() == 0


@pytest.fixture
def setup() -> Iterator[tuple[MemoryRegion, MemoryRegion, AddressSpace, Recorder, HostMemory]]:
    host = HostMemory(64 * MiB, "ram")
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    space = AddressSpace(root, "test")
    rec = Recorder()
    space.add_listener(rec)
    yield root, ram, space, rec, host
    space.destroy()
    host.close()


def slot(ram: MemoryRegion, i: int) -> MemoryRegion:
    return MemoryRegion.alias(f"slot{i}", ram, i * MiB, MiB, unmergeable=True)


def test_add_listener_replays_the_current_view(setup) -> None:
    root, ram, space, rec, _ = setup
    root.add_subregion(0, slot(ram, 0))
    root.add_subregion(MiB, slot(ram, 1))
    late = Recorder()
    space.add_listener(late)
    assert late.calls == [("begin", None), ("add", 0), ("add", MiB), ("commit", None)]
    space.remove_listener(late)
    assert late.calls[-4:] == [("begin", None), ("del", MiB), ("del", 0), ("commit", None)]
    assert late.live == {} and late.address_space is None


def test_one_bracket_per_outermost_commit(setup) -> None:
    root, ram, space, rec, _ = setup
    rec.calls.clear()
    with memory_transaction():
        with memory_transaction():
            root.add_subregion(0, slot(ram, 0))
        begin()
        root.add_subregion(MiB, slot(ram, 1))
        commit()
        assert rec.calls == [] and len(space.flatview) == 0       # nothing before the end
    assert rec.calls == [("begin", None), ("add", 0), ("add", MiB), ("commit", None)]
    assert len(space.flatview) == 2


def test_deletions_descend_additions_ascend_unchanged_are_silent(setup) -> None:
    root, ram, space, rec, _ = setup
    slots = [slot(ram, i) for i in range(6)]
    with memory_transaction():
        for i in (0, 1, 2, 3):
            root.add_subregion(i * MiB, slots[i])
    rec.calls.clear()
    with memory_transaction():
        root.del_subregion(slots[1])
        root.del_subregion(slots[3])
        root.add_subregion(5 * MiB, slots[5])
        root.add_subregion(4 * MiB, slots[4])
    assert rec.calls == [("begin", None), ("del", 3 * MiB), ("del", MiB),
                         ("add", 4 * MiB), ("add", 5 * MiB), ("commit", None)]


def test_commit_without_change_calls_nobody(setup) -> None:
    root, ram, space, rec, _ = setup
    root.add_subregion(0, slot(ram, 0))
    rec.calls.clear()
    view = space.flatview
    with memory_transaction():
        root.add_subregion(8 * MiB, MemoryRegion.container("empty", MiB))
    empty = root.subregions[0]
    root.del_subregion(empty)
    assert rec.calls == []
    assert space.flatview is view


def test_failed_commit_rolls_back_tree_view_and_listener(setup) -> None:
    root, ram, space, rec, _ = setup
    keep, gone, extra, bad = slot(ram, 0), slot(ram, 1), slot(ram, 2), slot(ram, 3)
    with memory_transaction():
        root.add_subregion(0, keep)
        root.add_subregion(MiB, gone)
    view, live = space.flatview, dict(rec.live)
    rec.refuse_start = 3 * MiB
    with pytest.raises(OSError, match="refused by test listener"):
        with memory_transaction():
            root.del_subregion(gone)
            root.add_subregion(2 * MiB, extra)
            root.add_subregion(3 * MiB, bad)
    assert root.subregions == (gone, keep) and gone.parent is root
    assert extra.parent is None and bad.parent is None
    assert space.flatview is view
    assert rec.live == live                       # the deletion and addition were undone
    rec.refuse_start = None
    root.add_subregion(2 * MiB, extra)            # the tree is usable afterwards
    assert sorted(rec.live) == [0, MiB, 2 * MiB]


def test_failed_single_mutation_raises_from_the_call(setup) -> None:
    root, ram, space, rec, _ = setup
    rec.refuse_start = 0
    s = slot(ram, 0)
    with pytest.raises(OSError):
        root.add_subregion(0, s)
    assert s.parent is None and root.subregions == () and rec.live == {}


def test_exception_in_body_reverts_only_that_block(setup) -> None:
    root, ram, space, rec, _ = setup
    a, b = slot(ram, 0), slot(ram, 1)
    with memory_transaction():
        root.add_subregion(0, a)
        with pytest.raises(KeyError):
            with memory_transaction():
                root.add_subregion(MiB, b)
                a.set_enabled(False)
                raise KeyError("abort inner")
        assert b.parent is None and a.enabled
    assert sorted(rec.live) == [0]


def test_commit_without_begin_is_refused() -> None:
    with pytest.raises(RuntimeError, match="without begin"):
        commit()


def test_listener_refusing_replay_is_not_attached(setup) -> None:
    root, ram, space, rec, _ = setup
    root.add_subregion(0, slot(ram, 0))
    root.add_subregion(MiB, slot(ram, 1))
    picky = Recorder(refuse_start=MiB)
    with pytest.raises(OSError):
        space.add_listener(picky)
    assert picky.live == {} and picky not in space.listeners and picky.address_space is None


def test_listener_serves_one_address_space(setup) -> None:
    _, _, space, rec, _ = setup
    other = AddressSpace(MemoryRegion.container("other", 1 << 64), "other")
    with pytest.raises(ValueError, match="already serves"):
        other.add_listener(rec)
    with pytest.raises(ValueError, match="not attached"):
        other.remove_listener(rec)
    other.destroy()


def test_read_write_dispatch_to_ram_and_io(setup) -> None:
    root, ram, space, _, host = setup
    log: list[tuple[str, int, int, int]] = []
    dev = MemoryRegion.io("dev", 0x100, read=lambda off, size: 0xAB00 + off,
                          write=lambda off, size, val: log.append(("w", off, size, val)))
    root.add_subregion(0x1000_0000, dev)
    root.add_subregion(0, MemoryRegion.alias("low", ram, MiB, MiB))
    space.write(0x10, 4, 0x11223344)
    assert host.read(MiB + 0x10, 4) == bytes.fromhex("44332211")
    assert space.read(0x10, 2) == 0x3344
    assert space.read(0x1000_0008, 4) == 0xAB08
    space.write(0x1000_0004, 1, 7)
    assert log == [("w", 4, 1, 7)]
    with pytest.raises(UnassignedAccessError):
        space.read(0x2000_0000, 4)
    with pytest.raises(UnassignedAccessError):
        space.read(MiB - 2, 4)                     # crosses the end of the range


def test_two_address_spaces_roll_back_together(setup) -> None:
    root, ram, space, rec, _ = setup
    shared = MemoryRegion.container("shared", 4 * MiB)
    root.add_subregion(0, shared)
    other_root = MemoryRegion.container("other-root", 1 << 64)
    other_root.add_subregion(0, MemoryRegion.alias("view", shared, 0, 4 * MiB))
    other = AddressSpace(other_root, "other")
    refuser = Recorder(refuse_start=MiB)
    other.add_listener(refuser)
    with pytest.raises(OSError):
        with memory_transaction():
            shared.add_subregion(0, slot(ram, 0))
            shared.add_subregion(MiB, slot(ram, 1))
    assert rec.live == {} and refuser.live == {} and shared.subregions == ()
    assert len(space.flatview) == 0 and len(other.flatview) == 0
    other.destroy()


OPS = st.lists(st.tuples(st.sampled_from(["map", "unmap", "toggle", "unmergeable", "readonly"]),
                         st.integers(0, 5)), min_size=1, max_size=4)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(OPS, st.sampled_from([None, 0, 2 * MiB, 3 * MiB])), max_size=12))
def test_listener_always_matches_the_view_and_failures_change_nothing(batches) -> None:
    host = HostMemory(8 * MiB, "ram")
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    space = AddressSpace(root, "prop")
    rec = Recorder()
    space.add_listener(rec)
    aliases = [MemoryRegion.alias(f"a{i}", ram, i * MiB, MiB) for i in range(6)]

    def state() -> list[tuple[object, ...]]:
        return [(a.parent, a.enabled, a.unmergeable, a.readonly) for a in aliases]

    try:
        for ops, refuse in batches:
            rec.refuse_start = refuse
            before, view = state(), space.flatview
            try:
                with memory_transaction():
                    for op, i in ops:
                        a = aliases[i]
                        if op == "map" and a.parent is None:
                            root.add_subregion(i * MiB, a)
                        elif op == "unmap" and a.parent is not None:
                            root.del_subregion(a)
                        elif op == "toggle":
                            a.set_enabled(not a.enabled)
                        elif op == "unmergeable":
                            a.set_unmergeable(not a.unmergeable)
                        elif op == "readonly":
                            a.set_readonly(not a.readonly)
            except OSError:
                assert state() == before and space.flatview is view
            assert sorted(rec.live.values(), key=lambda fr: fr.start) == list(space.flatview)
            assert space.flatview.ranges == tuple(simplify(render(root)))
    finally:
        space.destroy()
        host.close()
