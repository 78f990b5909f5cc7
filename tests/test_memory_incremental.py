"""The incremental commit gives the view a full rendering gives, and is taken when it can be."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.memory import AddressSpace, FlatRange, HostMemory, MemoryListener, MemoryRegion, memory_transaction
from kvmmem.memory import address_space as address_space_module
from kvmmem.memory.address_index import AddressIndex
from kvmmem.memory.flatview import render, simplify

MiB = 1 << 20


class Live(MemoryListener):
    """Holds the ranges it was told exist."""

    def __init__(self) -> None:
        self.live: dict[int, FlatRange] = {}
        self.calls = 0

    def region_add(self, fr: FlatRange) -> None:
        assert fr.start not in self.live
        self.live[fr.start] = fr
        self.calls += 1

    def region_del(self, fr: FlatRange) -> None:
        assert self.live.pop(fr.start) == fr
        self.calls += 1

    def ranges(self) -> list[FlatRange]:
        return [self.live[k] for k in sorted(self.live)]


def fresh_render(root: MemoryRegion) -> tuple[FlatRange, ...]:
    """The view from scratch: every cached rendering below ``root`` dropped first."""
    stack, seen = [root], set()
    while stack:
        mr = stack.pop()
        if id(mr) in seen:
            continue
        seen.add(id(mr))
        mr._rcache = None
        stack.extend(mr._children)
        if mr.target is not None:
            stack.append(mr.target)
    return tuple(simplify(render(root)))


class NoFullRender:
    """Makes a full rendering inside the transaction machinery fail loudly."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def refuse(root: MemoryRegion) -> list[FlatRange]:
            raise AssertionError(f"full rendering of {root.name!r}")
        monkeypatch.setattr(address_space_module, "render", refuse)


@pytest.fixture
def memslots() -> Iterator[tuple[AddressSpace, MemoryRegion, MemoryRegion, Live]]:
    """A system root holding a container of 100 unmergeable 1 MiB aliases."""
    host = HostMemory(256 * MiB, "mem0")
    ram = MemoryRegion.ram("mem0", host)
    root = MemoryRegion.container("system", 1 << 64)
    box = MemoryRegion.container("virtio-mem-memslots", 256 * MiB)
    low = MemoryRegion.alias("pc.ram", ram, 0, 16 * MiB)
    space = AddressSpace(root, "memory")
    live = Live()
    space.add_listener(live)
    with memory_transaction():
        root.add_subregion(0, low)
        root.add_subregion(1 << 32, box)
        for i in range(100):
            box.add_subregion(i * MiB, MemoryRegion.alias(f"slot{i}", ram, i * MiB, MiB,
                                                          unmergeable=True))
    yield space, box, ram, live
    space.destroy()
    host.close()


def test_adding_and_removing_an_alias_splices_without_rendering(memslots, monkeypatch) -> None:
    space, box, ram, live = memslots
    alias = MemoryRegion.alias("slot200", ram, 200 * MiB, MiB, unmergeable=True)
    NoFullRender(monkeypatch)
    box.add_subregion(200 * MiB, alias)
    added = space.lookup((1 << 32) + 200 * MiB)
    assert added is not None and added.alias is alias and added.size == MiB
    assert len(space.flatview) == 102 and live.ranges() == list(space.flatview)
    with memory_transaction():               # two windows in one commit
        box.del_subregion(alias)
        box.del_subregion(box.subregions[-1])
    assert len(space.flatview) == 100 and live.ranges() == list(space.flatview)
    monkeypatch.undo()
    assert space.flatview.ranges == fresh_render(space.root)


def test_overlap_falls_back_to_a_full_rendering(memslots, monkeypatch) -> None:
    space, box, ram, _ = memslots
    over = MemoryRegion.alias("over", ram, 0, 2 * MiB)      # covers slot0 and slot1
    NoFullRender(monkeypatch)
    with pytest.raises(AssertionError, match="full rendering"):
        box.add_subregion(0, over, priority=1)
    monkeypatch.undo()
    box.add_subregion(0, over, priority=1)
    assert space.flatview.ranges == fresh_render(space.root)
    assert space.lookup(1 << 32).alias is over


def test_mergeable_neighbours_fall_back_and_merge(memslots) -> None:
    space, _, ram, _ = memslots
    root = space.root
    # pc.ram shows [0, 16 MiB) of mem0; the continuation merges with it
    more = MemoryRegion.alias("more", ram, 16 * MiB, 16 * MiB)
    root.add_subregion(16 * MiB, more)
    assert space.lookup(0).size == 32 * MiB
    assert space.flatview.ranges == fresh_render(root)


def test_removing_a_merged_range_falls_back_and_keeps_the_neighbour(memslots) -> None:
    space, _, ram, _ = memslots
    root = space.root
    more = MemoryRegion.alias("more", ram, 16 * MiB, 16 * MiB)
    root.add_subregion(16 * MiB, more)
    root.del_subregion(more)               # its range was merged with pc.ram's
    assert space.lookup(0).size == 16 * MiB and space.lookup(16 * MiB) is None
    assert space.flatview.ranges == fresh_render(root)


def test_a_space_root_placed_in_a_container_is_rendered_again() -> None:
    host = HostMemory(8 * MiB, "m")
    inner = MemoryRegion.container("inner", 8 * MiB)
    inner.add_subregion(0, MemoryRegion.ram("r", host))
    outer = MemoryRegion.container("outer", 64 * MiB)
    inner_space, outer_space = AddressSpace(inner, "inner"), AddressSpace(outer, "outer")
    try:
        outer.add_subregion(16 * MiB, inner)
        for space in (inner_space, outer_space):
            assert space.flatview.ranges == fresh_render(space.root)
        assert outer_space.lookup(16 * MiB) is not None
    finally:
        inner_space.destroy()
        outer_space.destroy()
        host.close()


def test_address_index_answers_overlap_questions() -> None:
    host = HostMemory(16 * MiB, "m")
    ram = MemoryRegion.ram("m", host)
    kids = []
    for i, (addr, size) in enumerate([(0, 2), (4, 2), (6, 1), (10, 4)]):
        kid = MemoryRegion.alias(f"k{i}", ram, 0, size * MiB)
        kid.addr = addr * MiB
        kids.append(kid)
    index = AddressIndex(kids[::-1])
    assert index.disjoint
    assert not index.overlaps(2 * MiB, 4 * MiB, None)
    assert index.overlaps(1 * MiB, 3 * MiB, None)
    assert index.overlaps(5 * MiB, 8 * MiB, None)
    assert not index.overlaps(4 * MiB, 6 * MiB, kids[1])
    assert index.overlaps(4 * MiB, 7 * MiB, kids[1])
    assert not index.overlaps(14 * MiB, 20 * MiB, None)
    index.remove(kids[1])
    assert not index.overlaps(4 * MiB, 6 * MiB, None)
    wide = MemoryRegion.alias("wide", ram, 0, 8 * MiB)
    wide.addr = 3 * MiB
    index.insert(wide)
    assert not index.disjoint and index.overlaps(15 * MiB, 16 * MiB, None)   # "maybe"
    host.close()


# -- property: any sequence of mutations, spliced or rendered, gives the full rendering's view

LEAVES = 10
# Mostly additions and removals (what the splice does); the other mutations
# force full renderings in between, which the splice must then build on.
OPS = st.lists(st.tuples(st.sampled_from(["add"] * 4 + ["append"] * 2 + ["del"] * 4 + ["move", "toggle",
                                          "readonly", "toggle-box"]),
                         st.integers(0, LEAVES - 1), st.integers(0, 3), st.integers(0, 15),
                         st.integers(0, 1)),
               min_size=1, max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, min_size=1, max_size=10))
def test_any_commit_gives_the_view_of_a_full_rendering(batches) -> None:
    host = HostMemory(64 * MiB, "ram")
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 512 * MiB)
    a = MemoryRegion.container("a", 64 * MiB)
    b = MemoryRegion.container("b", 64 * MiB)
    c = MemoryRegion.container("c", 24 * MiB)
    window = MemoryRegion.alias("window-on-a", a, 0, 64 * MiB)      # makes `a` aliased
    with memory_transaction():
        root.add_subregion(0, a)
        root.add_subregion(128 * MiB, b)
        b.add_subregion(40 * MiB, c)
        root.add_subregion(320 * MiB, window)
    spaces = [AddressSpace(root, "root"), AddressSpace(b, "b")]
    listeners = [Live(), Live()]
    for space, listener in zip(spaces, listeners):
        space.add_listener(listener)
    boxes = [root, a, b, c]
    leaves, ram_offset = [], 0
    for i in range(LEAVES):
        size = (1 + i % 2) * MiB
        if i % 5 == 4:
            leaves.append(MemoryRegion.io(f"io{i}", size))
        else:          # consecutive leaves continue each other in RAM: some merge
            leaves.append(MemoryRegion.alias(f"l{i}", ram, ram_offset, size,
                                             unmergeable=i % 3 == 0))
        ram_offset += size
    try:
        for ops in batches:
            with memory_transaction():
                for op, i, box_index, offset, prio in ops:
                    leaf, box = leaves[i], boxes[box_index]
                    if box is root:
                        offset += 200             # mostly clear of a, b and the window
                    if op == "add" and leaf.parent is None:
                        box.add_subregion(offset * MiB, leaf, priority=prio)
                    elif op == "append" and leaf.parent is None and leaves[i - 1].parent:
                        before = leaves[i - 1]        # right after it: the two may merge
                        before.parent.add_subregion(before.addr + before.size, leaf)
                    elif op == "del" and leaf.parent is not None:
                        leaf.parent.del_subregion(leaf)
                    elif op == "move" and leaf.parent is not None:
                        leaf.set_address(offset * MiB)
                    elif op == "toggle":
                        leaf.set_enabled(not leaf.enabled)
                    elif op == "readonly":
                        box.set_readonly(not box.readonly)
                    elif op == "toggle-box" and box is not root:
                        box.set_enabled(not box.enabled)
            for space, listener in zip(spaces, listeners):
                assert space.flatview.ranges == fresh_render(space.root)
                assert listener.ranges() == list(space.flatview)
    finally:
        for space in spaces:
            space.destroy()
        host.close()
