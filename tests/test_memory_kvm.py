"""The seed's memory tree on real KVM: memslots, ioctl counts, rollback, `info mtree`."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from seed import seed_listings

from kvmmem.memory import AddressSpace, HostMemory, KvmMemoryListener, MemoryRegion, memory_transaction, mtree_info

GiB = 1 << 30
SET_REGION = "KVM_SET_USER_MEMORY_REGION"

pytestmark = pytest.mark.kvm


def contains_block(text: str, block: list[str]) -> bool:
    lines = text.splitlines()
    n = len(block)
    return any(lines[i:i + n] == block for i in range(len(lines) - n + 1))


@dataclass
class PcMachine:
    """The seed's pc machine: 4 GiB RAM, device memory at 5 GiB, a 500 GiB virtio-mem."""

    system: MemoryRegion
    device_memory: MemoryRegion
    memslots: MemoryRegion
    mem0: MemoryRegion
    aliases: list[MemoryRegion]
    space: AddressSpace
    listener: KvmMemoryListener
    hosts: list[HostMemory]

    def map_aliases(self, count: int) -> None:
        """Map exactly memslot aliases 0..count-1, in one transaction."""
        with memory_transaction():
            for i, alias in enumerate(self.aliases):
                if i < count and alias.parent is None:
                    self.memslots.add_subregion(i * GiB, alias)
                elif i >= count and alias.parent is not None:
                    self.memslots.del_subregion(alias)

    def expected_slots(self, count: int) -> set[tuple[int, int, int]]:
        pc_ram, mem0 = self.hosts
        boot = {(0, 3 * GiB, pc_ram.address), (4 * GiB, GiB, pc_ram.address + 3 * GiB)}
        return boot | {(0x140000000 + i * GiB, GiB, mem0.address + i * GiB) for i in range(count)}


@pytest.fixture
def pc(vm) -> Iterator[PcMachine]:  # type: ignore[no-untyped-def]
    yield from build_pc(vm, unmergeable=True)


def build_pc(vm, unmergeable: bool) -> Iterator[PcMachine]:  # type: ignore[no-untyped-def]
    pc_ram_host = HostMemory(4 * GiB, "pc.ram")
    mem0_host = HostMemory(500 * GiB, "mem0")
    pc_ram = MemoryRegion.ram("pc.ram", pc_ram_host)
    mem0 = MemoryRegion.ram("mem0", mem0_host)
    system = MemoryRegion.container("system", 1 << 64)
    device_memory = MemoryRegion.container("device-memory", 0x1047FFFFFFF - 0x140000000 + 1)
    memslots = MemoryRegion.container("virtio-mem-memslots", 500 * GiB)
    with memory_transaction():
        system.add_subregion(0, MemoryRegion.alias("ram-below-4g", pc_ram, 0, 3 * GiB))
        system.add_subregion(4 * GiB, MemoryRegion.alias("ram-above-4g", pc_ram, 3 * GiB, GiB))
        system.add_subregion(0x140000000, device_memory)
        device_memory.add_subregion(0, memslots)
    aliases = [MemoryRegion.alias(f"virtio-mem-memslot-{i}", mem0, i * GiB, GiB,
                                  unmergeable=unmergeable) for i in range(500)]
    space = AddressSpace(system, "memory")
    listener = KvmMemoryListener(vm)
    space.add_listener(listener)
    yield PcMachine(system, device_memory, memslots, mem0, aliases, space, listener,
                    [pc_ram_host, mem0_host])
    space.destroy()
    for host in (pc_ram_host, mem0_host):
        host.close()


def kvm_slots(vm) -> set[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return {(s.guest_phys_addr, s.memory_size, s.userspace_addr) for s in vm.memslots.values()}


def test_seed_listings_and_memslots(pc: PcMachine, vm) -> None:  # type: ignore[no-untyped-def]
    listings = seed_listings()
    for count, listing in zip((0, 3, 21, 6), listings):
        before = vm.ioctl_counts[SET_REGION]
        previous = len(vm.memslots)
        pc.map_aliases(count)
        text = mtree_info(spaces=[pc.space])
        assert contains_block(text, listing), f"listing for {count} memslots:\n{text}"
        assert kvm_slots(vm) == pc.expected_slots(count)
        assert vm.ioctl_counts[SET_REGION] - before == abs(len(vm.memslots) - previous)
        records = pc.listener.memslots()
        assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in records] == \
            sorted(pc.expected_slots(count))
        assert {r.slot for r in records} == set(vm.memslots)
        assert [r.alias for r in records[2:]] == [f"virtio-mem-memslot-{i}" for i in range(count)]
        assert all(r.region == "mem0" for r in records[2:])
    flat = mtree_info(True, spaces=[pc.space])
    assert "  0000000000000000-00000000bfffffff (prio 0, ram): pc.ram KVM\n" in flat
    assert ("  0000000280000000-00000002bfffffff (prio 0, ram): mem0 @0000000140000000 KVM\n"
            in flat)
    assert "memory-region: mem0\n  0000000000000000-0000007cffffffff (prio 0, ram): mem0\n" \
        in mtree_info(spaces=[pc.space])


def test_one_more_unmergeable_alias_costs_one_ioctl(pc: PcMachine, vm) -> None:  # type: ignore[no-untyped-def]
    pc.map_aliases(21)
    before_slots = dict(vm.memslots)
    before = vm.ioctl_counts[SET_REGION]
    pc.memslots.add_subregion(21 * GiB, pc.aliases[21])
    assert vm.ioctl_counts[SET_REGION] - before == 1
    after = dict(vm.memslots)
    assert {k: v for k, v in after.items() if k in before_slots} == before_slots
    (new,) = [v for k, v in after.items() if k not in before_slots]
    assert (new.guest_phys_addr, new.memory_size) == (0x140000000 + 21 * GiB, GiB)
    before = vm.ioctl_counts[SET_REGION]
    pc.memslots.del_subregion(pc.aliases[21])
    assert vm.ioctl_counts[SET_REGION] - before == 1
    assert dict(vm.memslots) == before_slots


def test_without_unmergeable_aliases_flatten_into_one_memslot(vm) -> None:  # type: ignore[no-untyped-def]
    for pc in build_pc(vm, unmergeable=False):
        pc.map_aliases(3)
        device_ranges = [fr for fr in pc.space.flatview if fr.region is pc.mem0]
        assert [(fr.start, fr.size, fr.offset) for fr in device_ranges] == [(0x140000000, 3 * GiB, 0)]
        assert kvm_slots(vm) == {(0, 3 * GiB, pc.hosts[0].address),
                                 (4 * GiB, GiB, pc.hosts[0].address + 3 * GiB),
                                 (0x140000000, 3 * GiB, pc.hosts[1].address)}
        before = vm.ioctl_counts[SET_REGION]
        pc.memslots.add_subregion(3 * GiB, pc.aliases[3])   # grows the merged range:
        assert vm.ioctl_counts[SET_REGION] - before == 2    # delete and re-create
        assert len(vm.memslots) == 3


def test_kvm_refusal_rolls_back_tree_view_and_memslots(pc: PcMachine, vm) -> None:  # type: ignore[no-untyped-def]
    pc.map_aliases(3)
    with HostMemory(GiB, "intruder") as other:
        # Someone else took the guest range where alias 4 goes.
        foreign = vm.add_memslot(0x140000000 + 4 * GiB, GiB, other.address)
        pc.memslots.del_subregion(pc.aliases[0])        # leaves a low free slot id
        slots_before = dict(vm.memslots)
        view_before = pc.space.flatview
        records_before = pc.listener.memslots()
        tree_before = mtree_info(spaces=[pc.space])
        with pytest.raises(OSError) as info:
            with memory_transaction():
                pc.memslots.del_subregion(pc.aliases[2])
                pc.memslots.add_subregion(3 * GiB, pc.aliases[3])
                pc.memslots.add_subregion(4 * GiB, pc.aliases[4])
        assert info.value.errno == errno.EEXIST
        assert dict(vm.memslots) == slots_before          # same slots under the same ids
        assert pc.space.flatview is view_before
        assert pc.listener.memslots() == records_before
        assert mtree_info(spaces=[pc.space]) == tree_before
        assert pc.aliases[2].parent is pc.memslots
        assert pc.aliases[3].parent is None and pc.aliases[4].parent is None
        vm.delete_memslot(foreign)
    pc.map_aliases(5)                                        # and it works afterwards
    assert kvm_slots(vm) == pc.expected_slots(5)


def test_io_ranges_get_no_memslot(vm) -> None:  # type: ignore[no-untyped-def]
    root = MemoryRegion.container("system", 1 << 64)
    space = AddressSpace(root, "memory")
    listener = KvmMemoryListener(vm)
    space.add_listener(listener)
    try:
        root.add_subregion(0xFEC00000, MemoryRegion.io("ioapic", 0x1000))
        assert len(vm.memslots) == 0 and listener.memslots() == []
        assert mtree_info(True, spaces=[space]).endswith(
            "  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic\n\n")
    finally:
        space.destroy()


def test_removing_the_listener_deletes_its_memslots(pc: PcMachine, vm) -> None:  # type: ignore[no-untyped-def]
    pc.map_aliases(3)
    assert len(vm.memslots) == 5
    pc.space.remove_listener(pc.listener)
    assert len(vm.memslots) == 0 and pc.listener.memslots() == []
    assert " KVM" not in mtree_info(True, spaces=[pc.space])
