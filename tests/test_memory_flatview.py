"""Rendering the region tree into flat views (kvmmem.memory.region, .flatview)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmmem.memory import AddressSpace, HostMemory, MemoryRegion, RegionKind
from kvmmem.memory.flatview import FlatRange, FlatView, diff, render, simplify

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def host() -> Iterator[HostMemory]:
    with HostMemory(64 * MiB, "backing") as h:
        yield h


def spans(view: FlatView) -> list[tuple[int, int, str, int]]:
    return [(fr.start, fr.end, fr.region.name, fr.offset) for fr in view]


def view_of(root: MemoryRegion) -> FlatView:
    space = AddressSpace(root, "test")
    view = space.flatview
    space.destroy()
    return view


# --- QEMU docs/devel/memory.rst, "Overlapping regions and priority" ------------------------------

def build_abcde(b_has_io: bool) -> tuple[MemoryRegion, dict[str, MemoryRegion]]:
    """A (0x8000) holds B (container at 0x2000, 0x4000, prio 2) and C (MMIO at 0, 0x6000,
    prio 1); B holds D (0x1000 at 0) and E (0x1000 at 0x2000)."""
    a = MemoryRegion.container("A", 0x8000)
    b = MemoryRegion.io("B", 0x4000) if b_has_io else MemoryRegion.container("B", 0x4000)
    c = MemoryRegion.io("C", 0x6000)
    d = MemoryRegion.io("D", 0x1000)
    e = MemoryRegion.io("E", 0x1000)
    b.add_subregion(0, d)
    b.add_subregion(0x2000, e)
    a.add_subregion(0x2000, b, priority=2)
    a.add_subregion(0, c, priority=1)
    return a, {"A": a, "B": b, "C": c, "D": d, "E": e}


def test_overlap_example_pure_container_shows_c_in_b_holes() -> None:
    # [CCCCCCCCCCCC][DDDDD][CCCCC][EEEEE][CCCCC]
    root, _ = build_abcde(b_has_io=False)
    assert spans(view_of(root)) == [
        (0x0000, 0x2000, "C", 0x0000),
        (0x2000, 0x3000, "D", 0x0000),
        (0x3000, 0x4000, "C", 0x3000),
        (0x4000, 0x5000, "E", 0x0000),
        (0x5000, 0x6000, "C", 0x5000),
    ]


def test_overlap_example_b_with_own_io_fills_its_holes() -> None:
    # [CCCCCCCCCCCC][DDDDD][BBBBB][EEEEE][BBBBB]
    root, _ = build_abcde(b_has_io=True)
    assert spans(view_of(root)) == [
        (0x0000, 0x2000, "C", 0x0000),
        (0x2000, 0x3000, "D", 0x0000),
        (0x3000, 0x4000, "B", 0x1000),
        (0x4000, 0x5000, "E", 0x0000),
        (0x5000, 0x6000, "B", 0x3000),
    ]


def test_overlap_example_priorities_are_local_to_a_container() -> None:
    # D and E's own priorities never compete with C's: only B vs C counts.
    root, r = build_abcde(b_has_io=False)
    b = r["B"]
    b.del_subregion(r["D"])
    b.add_subregion(0, r["D"], priority=-100)
    assert [name for _, _, name, _ in spans(view_of(root))] == ["C", "D", "C", "E", "C"]


def test_overlap_example_lower_priority_b_is_hidden_by_c() -> None:
    root, r = build_abcde(b_has_io=False)
    root.del_subregion(r["B"])
    root.add_subregion(0x2000, r["B"], priority=0)
    assert spans(view_of(root)) == [(0, 0x6000, "C", 0)]


# --- basic rules --------------------------------------------------------------------------------

def test_equal_priority_later_added_wins() -> None:
    root = MemoryRegion.container("root", 0x10000)
    first, second = MemoryRegion.io("first", 0x2000), MemoryRegion.io("second", 0x2000)
    root.add_subregion(0, first)
    root.add_subregion(0x1000, second)
    assert spans(view_of(root)) == [(0, 0x1000, "first", 0), (0x1000, 0x3000, "second", 0)]
    assert root.subregions == (second, first)


def test_children_are_clipped_to_their_parent() -> None:
    root = MemoryRegion.container("root", 0x10000)
    box = MemoryRegion.container("box", 0x1000)
    wide = MemoryRegion.io("wide", 0x4000)
    box.add_subregion(0x800, wide)
    root.add_subregion(0x3000, box)
    assert spans(view_of(root)) == [(0x3800, 0x4000, "wide", 0)]


def test_alias_maps_a_window_of_its_target(host: HostMemory) -> None:
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    root.add_subregion(GiB, MemoryRegion.alias("win", ram, 0x10000, 0x3000))
    (fr,) = view_of(root)
    assert (fr.start, fr.size, fr.region, fr.offset) == (GiB, 0x3000, ram, 0x10000)
    assert fr.alias is not None and fr.alias.name == "win" and fr.name == "win"
    assert fr.host_address == host.address + 0x10000


def test_alias_of_container_leaves_holes_for_lower_priority() -> None:
    inner = MemoryRegion.container("inner", 0x4000)
    inner.add_subregion(0x1000, MemoryRegion.io("dev", 0x1000))
    root = MemoryRegion.container("root", 0x10000)
    root.add_subregion(0, MemoryRegion.io("background", 0x10000), priority=-1)
    root.add_subregion(0x8000, MemoryRegion.alias("window", inner, 0, 0x4000), priority=1)
    assert spans(view_of(root)) == [
        (0x0000, 0x9000, "background", 0),
        (0x9000, 0xA000, "dev", 0),
        (0xA000, 0x10000, "background", 0xA000),
    ]


def test_ram_region_with_subregions_is_the_background(host: HostMemory) -> None:
    ram = MemoryRegion.ram("ram", host, 0, 0x10000)
    ram.add_subregion(0x4000, MemoryRegion.io("hole", 0x1000))
    view = view_of(ram)
    assert spans(view) == [(0, 0x4000, "ram", 0), (0x4000, 0x5000, "hole", 0),
                           (0x5000, 0x10000, "ram", 0x5000)]


def test_disabled_region_is_not_rendered_and_reveals_what_is_below() -> None:
    root = MemoryRegion.container("root", 0x10000)
    low = MemoryRegion.io("low", 0x10000)
    top = MemoryRegion.io("top", 0x1000)
    root.add_subregion(0, low)
    root.add_subregion(0, top, priority=1)
    space = AddressSpace(root, "t")
    assert space.lookup(0x10).region is top
    top.set_enabled(False)
    assert space.lookup(0x10).region is low and len(space.flatview) == 1
    top.set_enabled(True)
    assert space.lookup(0x10).region is top
    space.destroy()


def test_lookup_finds_ranges_and_gaps() -> None:
    root = MemoryRegion.container("root", 1 << 64)
    a, b = MemoryRegion.io("a", 0x1000), MemoryRegion.io("b", 0x1000)
    root.add_subregion(0x1000, a)
    root.add_subregion(0x5000, b)
    view = view_of(root)
    assert view.lookup(0x1000).region is a
    assert view.lookup(0x1FFF).region is a
    assert view.lookup(0x2000) is None
    assert view.lookup(0) is None
    assert view.lookup(0x5800).region is b
    assert view.lookup(0x6000) is None


def test_contiguous_aliases_merge_unless_unmergeable(host: HostMemory) -> None:
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    parts = [MemoryRegion.alias(f"part{i}", ram, i * MiB, MiB) for i in range(3)]
    for i, part in enumerate(parts):
        root.add_subregion(GiB + i * MiB, part)
    (merged,) = view_of(root)
    assert (merged.start, merged.size, merged.offset) == (GiB, 3 * MiB, 0)
    assert merged.alias is None                       # spans several aliases
    parts[1].set_unmergeable(True)
    assert [(fr.start, fr.size) for fr in view_of(root)] == [
        (GiB, MiB), (GiB + MiB, MiB), (GiB + 2 * MiB, MiB)]


def test_unmergeable_applies_to_everything_below(host: HostMemory) -> None:
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    box = MemoryRegion.container("box", 4 * MiB)
    box.set_unmergeable(True)
    for i in range(4):
        box.add_subregion(i * MiB, MemoryRegion.alias(f"p{i}", ram, i * MiB, MiB))
    root.add_subregion(0, box)
    view = view_of(root)
    assert len(view) == 4 and all(fr.unmergeable for fr in view)


def test_non_contiguous_offsets_do_not_merge(host: HostMemory) -> None:
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    root.add_subregion(0, MemoryRegion.alias("x", ram, 0, MiB))
    root.add_subregion(MiB, MemoryRegion.alias("y", ram, 2 * MiB, MiB))
    assert len(view_of(root)) == 2


def test_readonly_is_inherited_and_blocks_merging(host: HostMemory) -> None:
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("root", 1 << 64)
    rom = MemoryRegion.alias("rom", ram, 0, MiB)
    rom.set_readonly(True)
    root.add_subregion(0, rom)
    root.add_subregion(MiB, MemoryRegion.alias("rw", ram, MiB, MiB))
    view = view_of(root)
    assert [fr.readonly for fr in view] == [True, False]


def test_diff_reports_removed_and_added_in_address_order() -> None:
    r = MemoryRegion.io("r", 1 << 20)
    old = [FlatRange(0, 16, r, 0), FlatRange(32, 16, r, 32), FlatRange(64, 16, r, 64)]
    new = [FlatRange(0, 16, r, 0), FlatRange(32, 8, r, 32), FlatRange(48, 8, r, 48),
           FlatRange(64, 16, r, 64), FlatRange(96, 8, r, 96)]
    removed, added = diff(old, new)
    assert removed == [old[1]]
    assert added == [new[1], new[2], new[4]]
    assert diff(new, new) == ([], [])


# --- refusals -------------------------------------------------------------------------------------

def test_bad_subregion_calls_are_refused_and_change_nothing(host: HostMemory) -> None:
    root = MemoryRegion.container("root", 0x10000)
    box = MemoryRegion.container("box", 0x1000)
    root.add_subregion(0, box)
    ram = MemoryRegion.ram("ram", host)
    alias = MemoryRegion.alias("al", root, 0, 0x1000)
    with pytest.raises(ValueError, match="already mapped"):
        root.add_subregion(0x2000, box)
    with pytest.raises(ValueError, match="cycle"):
        box.add_subregion(0, root)
    with pytest.raises(ValueError, match="cycle"):
        box.add_subregion(0, alias)               # the alias reaches root, which holds box
    with pytest.raises(TypeError, match="alias"):
        alias.add_subregion(0, MemoryRegion.io("x", 1))
    with pytest.raises(ValueError, match="not a subregion"):
        box.del_subregion(ram)
    with pytest.raises(ValueError, match="64-bit"):
        root.add_subregion((1 << 64) - 1, MemoryRegion.io("y", 2))
    with pytest.raises(TypeError):
        root.add_subregion("0", ram)              # type: ignore[arg-type]
    assert root.subregions == (box,) and box.subregions == () and box.addr == 0


def test_bad_region_construction_is_refused(host: HostMemory) -> None:
    with pytest.raises(ValueError, match="outside host memory"):
        MemoryRegion.ram("r", host, 0, 128 * MiB)
    with pytest.raises(ValueError, match="outside its target"):
        MemoryRegion.alias("a", MemoryRegion.ram("r", host), 60 * MiB, 8 * MiB)
    with pytest.raises(TypeError):
        MemoryRegion.ram("r", object())           # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MemoryRegion.container("c", -1)
    with pytest.raises(TypeError):
        MemoryRegion.io("i", 16, read=42)         # type: ignore[arg-type]


# --- against a point-by-point model of memory.rst "Visibility" ----------------------------------

def resolve(mr: MemoryRegion, addr: int) -> tuple[MemoryRegion, int] | None:
    """Decode one address as memory.rst describes: subregions by priority, aliases
    continue at their target, a region with its own backing catches the rest."""
    if not mr.enabled or not 0 <= addr < mr.size:
        return None
    if mr.kind is RegionKind.ALIAS:
        assert mr.target is not None
        return resolve(mr.target, addr + mr.alias_offset)
    for child in mr.subregions:
        hit = resolve(child, addr - child.addr)
        if hit is not None:
            return hit
    return (mr, addr) if mr.is_terminal else None


UNIT = 0x10


@st.composite
def region_trees(draw: st.DrawFn) -> MemoryRegion:
    """Small random trees of containers, I/O regions and aliases (sizes in UNITs)."""
    made: list[MemoryRegion] = []
    counter = iter(range(1000))

    def node(depth: int) -> MemoryRegion:
        kinds = ["io", "container", "alias"] if depth < 3 else ["io"]
        kind = draw(st.sampled_from(kinds))
        size = draw(st.integers(1, 16)) * UNIT
        name = f"n{next(counter)}"
        if kind == "alias" and made:
            target = draw(st.sampled_from(made))
            off = draw(st.integers(0, target.size // UNIT - 1)) * UNIT
            mr = MemoryRegion.alias(name, target, off, min(size, target.size - off))
        elif kind == "container" or kind == "io" and draw(st.booleans()):
            mr = (MemoryRegion.container(name, size) if kind == "container"
                  else MemoryRegion.io(name, size))
            for _ in range(draw(st.integers(0, 3))):
                child = node(depth + 1)
                mr.add_subregion(draw(st.integers(0, 16)) * UNIT, child,
                                 draw(st.integers(-1, 1)))
        else:
            mr = MemoryRegion.io(name, size)
        if draw(st.integers(0, 9)) == 0:
            mr.set_enabled(False)
        made.append(mr)
        return mr

    root = MemoryRegion.container("root", 40 * UNIT)
    for _ in range(draw(st.integers(1, 5))):
        root.add_subregion(draw(st.integers(0, 30)) * UNIT, node(1), draw(st.integers(-1, 1)))
    return root


@settings(max_examples=150, deadline=None)
@given(region_trees())
def test_flat_view_matches_point_by_point_decoding(root: MemoryRegion) -> None:
    ranges = simplify(render(root))
    view = FlatView(root, ranges)
    for a, b in zip(ranges, ranges[1:]):
        assert a.end <= b.start                                    # sorted, disjoint
        assert not (a.end == b.start and a.region is b.region
                    and a.offset + a.size == b.offset)              # fully merged
    for addr in range(0, 48 * UNIT, UNIT // 2):
        expected = resolve(root, addr)
        fr = view.lookup(addr)
        if expected is None:
            assert fr is None, hex(addr)
        else:
            assert fr is not None, hex(addr)
            assert (fr.region, fr.offset + addr - fr.start) == expected, hex(addr)
