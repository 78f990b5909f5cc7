"""The pc memory map (kvmmem.vmm.pc_layout), device-memory placement and memslot budgets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmmem.devices.memory_device import DeviceMemory, MemoryDeviceError, MemoryRange, MemslotBudgetError, PluggedDevice
from kvmmem.devices.memslot_budget import (
    MAX_MEMSLOTS_PER_DEVICE,
    MIN_MEMSLOT_SIZE,
    MemslotBudget,
    Reservation,
    memslots_for_device,
)
from kvmmem.vmm.pc_layout import MachineMemoryMap

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
KVM_MAX_MEMSLOTS = 32764


# --- machine memory map -------------------------------------------------------------------------

def test_pc_machine_with_4g_puts_device_memory_at_5g() -> None:
    machine = MachineMemoryMap(4 * GiB, maxmem=8 * GiB)
    assert machine.ram_below_4g == MemoryRange("ram-below-4g", 0, 3 * GiB)
    assert machine.ram_above_4g == MemoryRange("ram-above-4g", 4 * GiB, GiB)
    assert machine.device_memory is not None
    assert machine.device_memory.start == 0x140000000
    assert machine.device_memory.size == 4 * GiB


def test_seed_machine_device_memory_range() -> None:
    machine = MachineMemoryMap(4 * GiB, maxmem=1028 * GiB, slots=13)
    area = machine.device_memory
    assert area is not None and area.name == "device-memory"
    assert (area.start, area.last) == (0x140000000, 0x1047FFFFFFF)
    assert area.size == 1037 * GiB
    assert [r.name for r in machine.regions()] == ["ram-below-4g", "ram-above-4g", "device-memory"]


def test_small_ram_has_no_high_ram_and_device_memory_at_4g() -> None:
    machine = MachineMemoryMap(2 * GiB, maxmem=4 * GiB)
    assert machine.ram_below_4g.size == 2 * GiB
    assert machine.ram_above_4g is None
    assert machine.device_memory == MemoryRange("device-memory", 4 * GiB, 2 * GiB)


def test_exactly_3g_ram_fills_low_memory_only() -> None:
    machine = MachineMemoryMap(3 * GiB, maxmem=4 * GiB, slots=1)
    assert machine.ram_above_4g is None
    assert machine.device_memory == MemoryRange("device-memory", 4 * GiB, 2 * GiB)


def test_device_memory_starts_at_the_next_gib_boundary() -> None:
    machine = MachineMemoryMap(3 * GiB + 512 * MiB, maxmem=8 * GiB)
    assert machine.ram_above_4g == MemoryRange("ram-above-4g", 4 * GiB, 512 * MiB)
    assert machine.device_memory is not None
    assert machine.device_memory.start == 5 * GiB


@given(ram_mib=st.integers(1, 64 * 1024), extra_mib=st.integers(0, 64 * 1024), slots=st.integers(0, 256))
def test_memory_map_invariants(ram_mib: int, extra_mib: int, slots: int) -> None:
    if extra_mib == 0 and slots:
        slots = 0
    machine = MachineMemoryMap(ram_mib * MiB, maxmem=(ram_mib + extra_mib) * MiB, slots=slots)
    regions = machine.regions()
    assert sum(r.size for r in regions if r.name.startswith("ram")) == ram_mib * MiB
    assert all(a.end <= b.start for a, b in zip(regions, regions[1:]))
    assert machine.ram_below_4g.end <= 3 * GiB
    area = machine.device_memory
    if extra_mib == 0 and slots == 0:
        assert area is None
    else:
        assert area is not None
        assert area.start % GiB == 0 and area.start >= 4 * GiB
        high = machine.ram_above_4g
        if high is None:
            assert area.start == 4 * GiB
        else:
            assert 0 <= area.start - high.end < GiB
        assert area.size == extra_mib * MiB + slots * GiB


def test_no_maxmem_means_no_device_memory() -> None:
    assert MachineMemoryMap(4 * GiB).device_memory is None
    assert MachineMemoryMap(4 * GiB, maxmem=4 * GiB).device_memory is None


@pytest.mark.parametrize(("args", "message"), [
    ({"ram_size": 0}, "ram size 0x0 must be a positive multiple of the 0x1000-byte page size"),
    ({"ram_size": GiB + 1}, "ram size 0x40000001 must be a positive multiple"),
    ({"ram_size": GiB, "slots": 2}, "slots=2 needs maxmem"),
    ({"ram_size": 4 * GiB, "maxmem": 2 * GiB}, "maxmem 0x80000000 is below the ram size 0x100000000"),
    ({"ram_size": 4 * GiB, "maxmem": 4 * GiB + 1}, "maxmem 0x100000001 is not a multiple of the"),
    ({"ram_size": 4 * GiB, "maxmem": 4 * GiB, "slots": 1}, "slots=1 but maxmem equals the ram size"),
    ({"ram_size": GiB, "maxmem": 2 * GiB, "slots": 257}, "slots=257 is outside 0..256"),
    ({"ram_size": GiB, "maxmem": 2 * GiB, "slots": -1}, "slots=-1 is outside 0..256"),
])
def test_memory_map_refusals(args: dict[str, int], message: str) -> None:
    with pytest.raises(MemoryDeviceError, match=message):
        MachineMemoryMap(**args)


def test_memory_map_type_errors() -> None:
    with pytest.raises(TypeError, match="ram_size must be an int, not float"):
        MachineMemoryMap(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="maxmem must be an int, not str"):
        MachineMemoryMap(GiB, maxmem="2G")  # type: ignore[arg-type]


# --- device-memory placement --------------------------------------------------------------------

AREA = MemoryRange("device-memory", 0x140000000, 16 * GiB)


def test_first_fit_places_devices_one_after_another() -> None:
    dm = DeviceMemory(AREA)
    assert dm.plug("mem0", 2 * GiB, 2 * MiB) == AREA.start
    assert dm.plug("mem1", GiB, 2 * MiB) == AREA.start + 2 * GiB
    assert dm.used_size == 3 * GiB
    assert [d.device_id for d in dm.devices] == ["mem0", "mem1"]
    assert dm.get("mem1") == PluggedDevice("mem1", AREA.start + 2 * GiB, GiB, 2 * MiB)


def test_first_fit_aligns_to_the_device_alignment() -> None:
    dm = DeviceMemory(AREA)
    dm.plug("small", 2 * MiB, 2 * MiB)
    addr = dm.plug("big", 4 * GiB, 4 * GiB)
    assert addr == 0x200000000
    assert addr % (4 * GiB) == 0 and addr > AREA.start
    # the gap left by the alignment is still used by the next small device
    assert dm.plug("filler", 2 * MiB, 2 * MiB) == AREA.start + 2 * MiB


def test_unplug_frees_the_range_for_reuse() -> None:
    dm = DeviceMemory(AREA)
    first = dm.plug("a", GiB, 2 * MiB)
    dm.plug("b", GiB, 2 * MiB)
    assert dm.unplug("a") == PluggedDevice("a", first, GiB, 2 * MiB)
    assert dm.get("a") is None
    assert dm.plug("c", GiB, 2 * MiB) == first


def test_explicit_memaddr_is_used_as_given() -> None:
    dm = DeviceMemory(AREA)
    addr = AREA.start + 8 * GiB
    assert dm.plug("mem0", GiB, GiB, memaddr=addr) == addr
    assert dm.plug("mem1", 8 * GiB, GiB) == AREA.start
    assert dm.plug("mem2", GiB, GiB) == addr + GiB


def test_device_filling_the_whole_area_fits() -> None:
    dm = DeviceMemory(AREA)
    assert dm.plug("all", AREA.size, 2 * MiB) == AREA.start


def test_for_machine_uses_the_machine_area() -> None:
    dm = DeviceMemory(MachineMemoryMap(4 * GiB, maxmem=1028 * GiB, slots=13).device_memory)
    assert dm.area is not None and dm.area.start == 0x140000000
    assert dm.plug("mem0", 500 * GiB, 2 * MiB) == 0x140000000


def test_owner_of_an_address() -> None:
    dm = DeviceMemory(AREA)
    dm.plug("a", GiB, 2 * MiB)
    dm.plug("b", GiB, 2 * MiB)
    assert dm.owner(AREA.start) == "a" and dm.owner(AREA.start + GiB - 1) == "a"
    assert dm.owner(AREA.start + GiB) == "b"
    assert dm.owner(AREA.start + 2 * GiB) is None and dm.owner(0) is None


def _refused(dm: DeviceMemory, message: str, *args: object, **kwargs: object) -> None:
    before = dm.devices
    with pytest.raises(MemoryDeviceError, match=message):
        dm.plug(*args, **kwargs)  # type: ignore[arg-type]
    assert dm.devices == before


def test_refuses_without_maxmem() -> None:
    dm = DeviceMemory(MachineMemoryMap(4 * GiB).device_memory)
    _refused(dm, "the machine has no device-memory area: start it with maxmem above the ram size",
             "mem0", GiB, 2 * MiB)


def test_refuses_a_device_larger_than_the_area() -> None:
    dm = DeviceMemory(AREA)
    _refused(dm, r"memory device 'mem0' of 0x400200000 bytes is larger than the device-memory area "
                 r"\[0x140000000-0x53fffffff\] of 0x400000000 bytes: raise maxmem",
             "mem0", 16 * GiB + 2 * MiB, 2 * MiB)


def test_refuses_when_no_room_is_left() -> None:
    dm = DeviceMemory(AREA)
    dm.plug("a", 12 * GiB, 2 * MiB)
    _refused(dm, "memory device 'b' needs 0x140000000 bytes but only 0x100000000 of the "
                 "0x400000000-byte device-memory area are free", "b", 5 * GiB, 2 * MiB)


def test_refuses_when_free_space_is_fragmented() -> None:
    dm = DeviceMemory(AREA)
    for i in range(4):
        dm.plug(f"d{i}", 4 * GiB, 2 * MiB)
    dm.unplug("d0")
    dm.unplug("d2")
    _refused(dm, "no free range of 0x200000000 bytes aligned to 0x200000 for memory device 'big': the free "
                 "0x200000000 bytes of the device-memory area are fragmented", "big", 8 * GiB, 2 * MiB)


def test_refuses_a_misaligned_memaddr() -> None:
    dm = DeviceMemory(AREA)
    _refused(dm, "memaddr 0x140100000 of memory device 'mem0' is not aligned to its alignment 0x200000",
             "mem0", GiB, 2 * MiB, memaddr=AREA.start + MiB)


@pytest.mark.parametrize("memaddr", [AREA.start - 2 * MiB, AREA.end - GiB + 2 * MiB, AREA.end, 0])
def test_refuses_a_memaddr_outside_the_area(memaddr: int) -> None:
    dm = DeviceMemory(AREA)
    _refused(dm, r"memory device 'mem0' at \[.*\] does not fit the device-memory area "
                 r"\[0x140000000-0x53fffffff\]", "mem0", GiB, 2 * MiB, memaddr=memaddr)


def test_refuses_an_overlapping_memaddr() -> None:
    dm = DeviceMemory(AREA)
    dm.plug("mem0", 2 * GiB, 2 * MiB)
    _refused(dm, r"memory device 'mem1' at \[0x1bfe00000-0x1ffdfffff\] overlaps memory device 'mem0' at "
                 r"\[0x140000000-0x1bfffffff\]", "mem1", GiB, 2 * MiB, memaddr=AREA.start + 2 * GiB - 2 * MiB)


def test_refuses_a_duplicate_id() -> None:
    dm = DeviceMemory(AREA)
    dm.plug("mem0", GiB, 2 * MiB)
    _refused(dm, r"memory device 'mem0' is already plugged at \[0x140000000-0x17fffffff\]", "mem0", GiB, 2 * MiB)


@pytest.mark.parametrize(("args", "message"), [
    (("", GiB, 2 * MiB), "memory device id '' must be a non-empty string"),
    (("m", GiB, 3 * MiB), "alignment 0x300000 of memory device 'm' is not a power of two"),
    (("m", GiB, 0), "alignment 0x0 of memory device 'm' is not a power of two"),
    (("m", GiB + MiB, 2 * MiB), "size 0x40100000 of memory device 'm' must be a positive multiple of its "
                                "alignment 0x200000"),
    (("m", 0, 2 * MiB), "size 0x0 of memory device 'm' must be a positive multiple"),
])
def test_refuses_bad_arguments(args: tuple[str, int, int], message: str) -> None:
    _refused(DeviceMemory(AREA), message, *args)


def test_unplug_of_an_unknown_device_is_refused() -> None:
    dm = DeviceMemory(AREA)
    dm.plug("mem0", GiB, 2 * MiB)
    with pytest.raises(MemoryDeviceError, match="memory device 'nope' is not plugged"):
        dm.unplug("nope")
    assert [d.device_id for d in dm.devices] == ["mem0"]


UNIT = MiB
SMALL_AREA = MemoryRange("device-memory", 64 * UNIT, 64 * UNIT)


def _lowest_fit(dm: DeviceMemory, size: int, align: int) -> int | None:
    for addr in range(SMALL_AREA.start, SMALL_AREA.end - size + 1, align):
        if all(addr + size <= d.addr or d.end <= addr for d in dm.devices):
            return addr
    return None


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(1, 24), st.integers(0, 4)),
                max_size=40))
def test_first_fit_matches_a_brute_force_search(ops: list[tuple[bool, int, int, int]]) -> None:
    dm = DeviceMemory(SMALL_AREA)
    for is_plug, dev, size_units, align_shift in ops:
        name = f"d{dev}"
        if not is_plug:
            if dm.get(name):
                dm.unplug(name)
            continue
        align = UNIT << align_shift
        size = -(-size_units * UNIT // align) * align
        expected = None if dm.get(name) else _lowest_fit(dm, size, align)
        if expected is None:
            before = dm.devices
            with pytest.raises(MemoryDeviceError):
                dm.plug(name, size, align)
            assert dm.devices == before
        else:
            assert dm.plug(name, size, align) == expected
        placed = dm.devices
        assert all(a.end <= b.addr for a, b in zip(placed, placed[1:]))
        assert all(SMALL_AREA.contains(d.addr, d.size) and d.addr % d.align == 0 for d in placed)


# --- memslot budget -----------------------------------------------------------------------------

class Slots:
    """A memslot consumer with a settable free count (stands in for KVM's or vhost's counter)."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self) -> int:
        return self.free


def test_free_is_the_minimum_over_consumers() -> None:
    kvm, vhost = Slots(32000), Slots(500)
    budget = MemslotBudget({"kvm": kvm})
    assert budget.free() == 32000
    budget.add_consumer("vhost", vhost)
    assert budget.free() == 500
    vhost.free = 40000
    assert budget.free() == 32000
    budget.remove_consumer("vhost")
    assert budget.consumers == ("kvm",)


def test_reservations_are_kept_from_other_users() -> None:
    kvm = Slots(100)
    budget = MemslotBudget({"kvm": kvm})
    budget.reserve("mem0", 60)
    assert budget.outstanding == 60
    assert budget.available() == 40
    budget.check_available("boot RAM", 40)
    with pytest.raises(MemslotBudgetError, match="vhost-net needs 41 memslots but only 40 may be taken: "
                                                 "100 are free and 60 are reserved for memory devices"):
        budget.check_available("vhost-net", 41)


def test_used_slots_stop_counting_as_outstanding() -> None:
    kvm = Slots(100)
    budget = MemslotBudget({"kvm": kvm})
    budget.reserve("mem0", 60)
    kvm.free -= 25  # the device maps 25 memslots in KVM
    budget.set_used("mem0", 25)
    assert budget.reservations["mem0"] == Reservation(60, 25)
    assert budget.outstanding == 35
    assert budget.available() == 40
    kvm.free += 25
    budget.set_used("mem0", 0)
    assert budget.available() == 40


def test_reserve_refuses_more_than_is_available() -> None:
    budget = MemslotBudget({"kvm": Slots(100)})
    budget.reserve("mem0", 60)
    with pytest.raises(MemslotBudgetError, match=r"memory device 'mem1' needs 41 memslots but only 40 are "
                                                 r"available \(100 free, 60 reserved for other memory devices\)"):
        budget.reserve("mem1", 41)
    assert dict(budget.reservations) == {"mem0": Reservation(60)}
    budget.reserve("mem1", 40)
    assert budget.available() == 0


def test_release_gives_the_slots_back() -> None:
    budget = MemslotBudget({"kvm": Slots(100)})
    budget.reserve("mem0", 60)
    assert budget.release("mem0") == Reservation(60)
    assert budget.available() == 100
    budget.reserve("mem1", 100)


def test_consumer_that_cannot_hold_the_reservations_is_refused() -> None:
    budget = MemslotBudget({"kvm": Slots(32000)})
    budget.reserve("mem0", 500)
    with pytest.raises(MemslotBudgetError, match="memslot consumer 'vhost' has 64 free memslots, fewer than "
                                                 "the 500 reserved for memory devices"):
        budget.add_consumer("vhost", Slots(64))
    assert budget.consumers == ("kvm",)
    assert budget.free() == 32000


@pytest.mark.parametrize(("action", "message"), [
    (lambda b: b.reserve("mem0", 1), "memory device 'mem0' already holds a reservation of 10 memslots"),
    (lambda b: b.reserve("mem1", 0), "memory device 'mem1' must reserve at least one memslot, not 0"),
    (lambda b: b.set_used("mem0", 11), "memory device 'mem0' cannot use 11 memslots: it reserved 10"),
    (lambda b: b.set_used("mem0", -1), "memory device 'mem0' cannot use -1 memslots"),
    (lambda b: b.set_used("nope", 1), "memory device 'nope' holds no memslot reservation"),
    (lambda b: b.release("nope"), "memory device 'nope' holds no memslot reservation"),
    (lambda b: b.add_consumer("kvm", Slots(5)), "memslot consumer 'kvm' is already registered"),
    (lambda b: b.remove_consumer("vhost"), "memslot consumer 'vhost' is not registered"),
])
def test_budget_refusals_change_nothing(action, message: str) -> None:  # type: ignore[no-untyped-def]
    budget = MemslotBudget({"kvm": Slots(100)})
    budget.reserve("mem0", 10)
    with pytest.raises(MemslotBudgetError, match=message):
        action(budget)
    assert dict(budget.reservations) == {"mem0": Reservation(10)}
    assert budget.consumers == ("kvm",)
    assert budget.available() == 90


def test_budget_without_consumers_or_with_a_broken_one() -> None:
    with pytest.raises(MemslotBudgetError, match="no memslot consumer is registered"):
        MemslotBudget().free()
    with pytest.raises(MemslotBudgetError, match="memslot consumer 'bad' reported -1 free memslots"):
        MemslotBudget({"bad": Slots(-1)}).free()


# --- memslots per device (QEMU's virtio_mem_decide_memslots) -------------------------------------------------

SEED_AREA = 1037 * GiB
BOOT_SLOTS = 2  # ram-below-4g and ram-above-4g


def test_seed_500g_device_gets_500_memslots_of_1g() -> None:
    split = memslots_for_device(500 * GiB, 2 * MiB, SEED_AREA, KVM_MAX_MEMSLOTS - BOOT_SLOTS)
    assert (split.count, split.memslot_size) == (500, GiB)
    # the auto limit is above the 1024 cap (virtio_mem_decide_memslots) ...
    assert (KVM_MAX_MEMSLOTS - BOOT_SLOTS) * 500 // 1037 > MAX_MEMSLOTS_PER_DEVICE
    assert split.limit == MAX_MEMSLOTS_PER_DEVICE
    # ... and 500 GiB / 1024 is below the 1 GiB minimum
    assert 500 * GiB // MAX_MEMSLOTS_PER_DEVICE < MIN_MEMSLOT_SIZE


def test_1t_device_gets_1024_memslots_of_1g() -> None:
    split = memslots_for_device(TiB, 2 * MiB, SEED_AREA, KVM_MAX_MEMSLOTS - BOOT_SLOTS)
    assert (split.count, split.memslot_size) == (1024, GiB)


def test_4t_device_gets_1024_memslots_of_4g() -> None:
    split = memslots_for_device(4 * TiB, 2 * MiB, 4 * TiB + 13 * GiB, KVM_MAX_MEMSLOTS - BOOT_SLOTS)
    assert (split.count, split.memslot_size) == (1024, 4 * GiB)


def test_few_free_memslots_make_memslots_bigger() -> None:
    split = memslots_for_device(500 * GiB, 2 * MiB, SEED_AREA, 64)
    assert split.limit == 64 * 500 // 1037 == 30
    assert split.memslot_size == 32 * GiB  # 500 GiB / 30 is 16.7 GiB, rounded up to a power of two
    assert split.count == 16 <= split.limit
    roomy = memslots_for_device(500 * GiB, 2 * MiB, SEED_AREA, 32000)
    assert split.memslot_size > roomy.memslot_size


def test_max_memslots_caps_the_count() -> None:
    split = memslots_for_device(500 * GiB, 2 * MiB, SEED_AREA, 32000, max_memslots=8)
    assert split.limit == 8
    assert split.memslot_size == 64 * GiB
    assert split.count == 8


def test_small_device_gets_one_memslot_of_at_least_1g() -> None:
    split = memslots_for_device(512 * MiB, 2 * MiB, SEED_AREA, 32000)
    assert (split.count, split.memslot_size) == (1, GiB)


def test_no_slots_for_memory_devices_still_allows_one() -> None:
    split = memslots_for_device(6 * GiB, 2 * MiB, SEED_AREA, 0)
    assert (split.limit, split.count, split.memslot_size) == (1, 1, 8 * GiB)


def test_block_size_above_1g_sets_the_minimum() -> None:
    split = memslots_for_device(16 * GiB, 4 * GiB, SEED_AREA, 32000)
    assert (split.count, split.memslot_size) == (4, 4 * GiB)


@given(blocks=st.integers(1, 1 << 22), block_shift=st.integers(20, 31), area_extra=st.integers(0, 1 << 22),
       slots=st.integers(0, 40000), max_memslots=st.integers(0, 2000))
def test_memslot_split_is_the_smallest_allowed(blocks: int, block_shift: int, area_extra: int, slots: int,
                                               max_memslots: int) -> None:
    block = 1 << block_shift
    size = blocks * block
    area = size + area_extra * MiB
    split = memslots_for_device(size, block, area, slots, max_memslots)
    m = split.memslot_size
    assert m >= max(block, MIN_MEMSLOT_SIZE) and m % block == 0 and m & (m - 1) == 0
    assert 1 <= split.count <= split.limit <= MAX_MEMSLOTS_PER_DEVICE
    assert split.count == -(-size // m)
    assert (split.count - 1) * m < size <= split.count * m
    if max_memslots:
        assert split.limit <= max_memslots
    half = m // 2
    assert half < max(block, MIN_MEMSLOT_SIZE) or -(-size // half) > split.limit


@pytest.mark.parametrize(("args", "message"), [
    ((GiB, 3 * MiB, SEED_AREA, 100), "block size 0x300000 is not a power of two"),
    ((GiB + MiB, 2 * MiB, SEED_AREA, 100), "device size 0x40100000 must be a positive multiple of the block size"),
    ((0, 2 * MiB, SEED_AREA, 100), "device size 0x0 must be a positive multiple"),
    ((4 * GiB, 2 * MiB, 2 * GiB, 100), "device of 0x100000000 bytes does not fit the device-memory area of "
                                       "0x80000000 bytes"),
    ((GiB, 2 * MiB, SEED_AREA, -1), "memslot counts must not be negative"),
    ((GiB, 2 * MiB, SEED_AREA, 100, -1), "memslot counts must not be negative"),
])
def test_memslots_for_device_refusals(args: tuple[int, ...], message: str) -> None:
    with pytest.raises(MemoryDeviceError, match=message):
        memslots_for_device(*args)
