"""`info mtree` text in QEMU's format (kvmmem.memory.mtree), without KVM."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvmmem.memory import AddressSpace, HostMemory, MemoryRegion, mtree_info

MiB = 1 << 20


@pytest.fixture
def host() -> Iterator[HostMemory]:
    with HostMemory(16 * MiB, "backing") as h:
        yield h


@pytest.fixture
def spaces() -> Iterator[list[AddressSpace]]:
    made: list[AddressSpace] = []
    yield made
    for space in made:
        space.destroy()


def test_tree_lines_ordering_aliases_and_targets(host: HostMemory, spaces) -> None:
    ram = MemoryRegion.ram("ram", host)
    bios = MemoryRegion.ram("bios", host, 0, MiB, readonly=True)
    inner = MemoryRegion.container("inner", 0x2000)
    inner.add_subregion(0x1000, MemoryRegion.alias("inner-ram", ram, 0x3000, 0x1000))
    root = MemoryRegion.container("sys", 1 << 64)
    root.add_subregion(0x10000, MemoryRegion.io("late-low-prio", 0x100), priority=-1)
    root.add_subregion(0x10000, MemoryRegion.io("hi", 0x100), priority=3)
    root.add_subregion(0, MemoryRegion.alias("low", ram, 0, 0x8000))
    root.add_subregion(0xF0000, MemoryRegion.alias("bios-alias", bios, 0, 0x10000))
    root.add_subregion(0x20000, MemoryRegion.alias("win", inner, 0, 0x2000), priority=1)
    off = MemoryRegion.io("off", 0x10)
    root.add_subregion(0x30000, off)
    off.set_enabled(False)
    spaces.append(AddressSpace(root, "zeta"))
    spaces.append(AddressSpace(root, "alpha"))
    text = mtree_info(spaces=spaces)
    assert text == (
        "address-space: alpha\n"
        "address-space: zeta\n"
        "  0000000000000000-ffffffffffffffff (prio 0, i/o): sys\n"
        "    0000000000000000-0000000000007fff (prio 0, ram): alias low @ram "
        "0000000000000000-0000000000007fff\n"
        "    0000000000010000-00000000000100ff (prio 3, i/o): hi\n"
        "    0000000000010000-00000000000100ff (prio -1, i/o): late-low-prio\n"
        "    0000000000020000-0000000000021fff (prio 1, i/o): alias win @inner "
        "0000000000000000-0000000000001fff\n"
        "    00000000000f0000-00000000000fffff (prio 0, rom): alias bios-alias @bios "
        "0000000000000000-000000000000ffff\n"
        "\n"
        "memory-region: ram\n"
        "  0000000000000000-0000000000ffffff (prio 0, ram): ram\n"
        "\n"
        "memory-region: inner\n"
        "  0000000000000000-0000000000001fff (prio 0, i/o): inner\n"
        "    0000000000001000-0000000000001fff (prio 0, ram): alias inner-ram @ram "
        "0000000000003000-0000000000003fff\n"
        "\n"
        "memory-region: bios\n"
        "  0000000000000000-00000000000fffff (prio 0, rom): bios\n"
        "\n")
    shown = mtree_info(spaces=spaces, disabled=True)
    assert "    0000000000030000-000000000003000f (prio 0, i/o): off [disabled]\n" in shown


def test_flat_view_lines(host: HostMemory, spaces) -> None:
    ram = MemoryRegion.ram("ram", host)
    root = MemoryRegion.container("sys", 1 << 64)
    root.add_subregion(0, MemoryRegion.alias("low", ram, 0, 0x8000))
    root.add_subregion(0x100000, MemoryRegion.alias("high", ram, 0x8000, 0x8000))
    rom = MemoryRegion.alias("rom", ram, 0x10000, 0x1000)
    rom.set_readonly(True)
    root.add_subregion(0x200000, rom)
    root.add_subregion(0xFEC00000, MemoryRegion.io("ioapic", 0x1000))
    spaces.append(AddressSpace(root, "memory"))
    spaces.append(AddressSpace(MemoryRegion.container("io", 0x10000), "I/O"))
    assert mtree_info(True, spaces=spaces) == (
        "FlatView #0\n"
        ' AS "memory", root: sys\n'
        " Root memory region: sys\n"
        "  0000000000000000-0000000000007fff (prio 0, ram): ram\n"
        "  0000000000100000-0000000000107fff (prio 0, ram): ram @0000000000008000\n"
        "  0000000000200000-0000000000200fff (prio 0, rom): ram @0000000000010000\n"
        "  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic\n"
        "\n"
        "FlatView #1\n"
        ' AS "I/O", root: io\n'
        " Root memory region: io\n"
        "  No rendered FlatView\n"
        "\n")


def test_address_spaces_sharing_a_root_share_one_flat_view(spaces) -> None:
    root = MemoryRegion.container("shared-root", 0x1000)
    root.add_subregion(0, MemoryRegion.io("dev", 0x10))
    spaces.append(AddressSpace(root, "cpu-memory-0"))
    spaces.append(AddressSpace(root, "cpu-memory-1"))
    text = mtree_info(True, spaces=spaces)
    assert text.count("FlatView #") == 1
    assert ' AS "cpu-memory-0", root: shared-root\n AS "cpu-memory-1", root: shared-root\n' in text


def test_alias_root_is_named_in_the_flat_view_header(spaces) -> None:
    target = MemoryRegion.container("bus", 0x1000)
    spaces.append(AddressSpace(MemoryRegion.alias("bus-window", target, 0, 0x1000), "dma"))
    assert ' AS "dma", root: bus-window, alias bus\n' in mtree_info(True, spaces=spaces)
