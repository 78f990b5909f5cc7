"""The virtio-mem device on real KVM: the seed's listings, memslots that
follow plugged blocks, guest reach, BUSY with rollback, memory returned."""

from __future__ import annotations

import pytest
from seed import seed_listings
from vmem_helpers import (
    PLUG,
    STATE,
    UNPLUG,
    UNPLUG_ALL,
    GiB,
    GuestReader,
    MiB,
    expected_ranges,
    kvm_ranges,
    plug_device,
    request,
    small_machine,
)

from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import BlockState, ResponseType
from kvmmem.kvm import exits
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine_memory import MachineMemory

pytestmark = pytest.mark.kvm


def device_memory_listing(machine: MachineMemory) -> list[str]:
    lines = machine.info_mtree().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("): device-memory"))
    out = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("      "):
            break
        out.append(line)
    return out


def test_seed_listings_in_usable_mode(vm) -> None:  # type: ignore[no-untyped-def]
    """A 500 GiB device on the seed's pc machine prints the seed's four
    listings byte for byte, and KVM holds exactly those memslots."""
    machine = MachineMemory(vm, 4 * GiB, maxmem=1028 * GiB, slots=13)
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(500 * GiB, "mem0"),
                                   memslots="usable"))
    machine.plug(dev)
    assert dev.memslot_size == GiB and dev.addr == 0x140000000
    seed = seed_listings()
    steps = [(0, False, 0), (2 * GiB, False, 3), (20 * GiB, False, 21), (5 * GiB, True, 6)]
    for listing, (requested, reboot, slots) in zip(seed, steps):
        dev.set_requested_size(requested)
        if reboot:
            machine.system_reset()
        assert device_memory_listing(machine) == listing
        assert kvm_ranges(vm, dev) == expected_ranges(dev, range(slots))
        assert vm.used_memslots == 2 + slots      # plus ram-below-4g and ram-above-4g
    machine.close()
    assert vm.used_memslots == 0


def test_dynamic_memslots_are_those_holding_plugged_blocks(vm) -> None:  # type: ignore[no-untyped-def]
    machine = small_machine(vm)
    dev = plug_device(machine, requested_size=8 * GiB)
    bpm = dev.memslot_size // dev.block_size
    assert kvm_ranges(vm, dev) == set()
    assert request(dev, PLUG, 3 * bpm + 2, 1).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == expected_ranges(dev, {3})
    assert request(dev, PLUG, 5 * bpm - 1, 2).type is ResponseType.ACK   # straddles 4 and 5
    assert kvm_ranges(vm, dev) == expected_ranges(dev, {3, 4, 5})
    assert request(dev, UNPLUG, 3 * bpm + 2, 1).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == expected_ranges(dev, {4, 5})
    assert request(dev, UNPLUG_ALL).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == set() and dev.plugged_size == 0
    machine.close()


def test_mapping_a_memslot_next_to_mapped_ones_is_one_ioctl(vm) -> None:  # type: ignore[no-untyped-def]
    machine = small_machine(vm)
    dev = plug_device(machine, requested_size=8 * GiB)
    bpm = dev.memslot_size // dev.block_size
    for index in (2, 4):
        request(dev, PLUG, index * bpm)
    before = dict(vm.memslots)
    calls = vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"]
    assert request(dev, PLUG, 3 * bpm).type is ResponseType.ACK
    assert vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"] == calls + 1
    assert all(vm.memslots[s] == m for s, m in before.items())  # neighbours untouched
    assert request(dev, UNPLUG, 3 * bpm).type is ResponseType.ACK
    assert vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"] == calls + 2
    assert dict(vm.memslots) == before
    machine.close()


def test_single_mode_maps_the_whole_region_as_one_memslot(vm) -> None:  # type: ignore[no-untyped-def]
    machine = small_machine(vm)
    dev = plug_device(machine, memslots="single", requested_size=GiB)
    assert kvm_ranges(vm, dev) == {(dev.addr, dev.region_size)}
    assert request(dev, PLUG, 0, 8).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == {(dev.addr, dev.region_size)}
    assert any(" mem-vmem0" in line and "(prio 0, ram)" in line for line in machine.info_mtree().splitlines())
    machine.close()


@pytest.mark.parametrize("protect", ["slot", "block"])
def test_guest_reach_of_unplugged_blocks(vm, protect: str) -> None:  # type: ignore[no-untyped-def]
    """Plugged blocks hold what the host wrote; an unplugged block in an
    unmapped memslot always exits; inside a mapped memslot it exits only
    with protect=block (with protect=slot the guest reads its zeros)."""
    machine = small_machine(vm)
    dev = plug_device(machine, requested_size=8 * GiB, protect=protect)
    bpm = dev.memslot_size // dev.block_size
    assert request(dev, PLUG, bpm, 1).type is ResponseType.ACK      # memslot 1, block 0
    dev.memdev.write(bpm * dev.block_size, (0x1122334455667788).to_bytes(8, "little"))
    guest = GuestReader(vm, machine, dev.addr + dev.region_size)
    plugged = dev.addr + bpm * dev.block_size
    assert guest.read(plugged) == (0x1122334455667788, None)

    value, trap = guest.read(plugged + dev.block_size)               # unplugged, memslot 1 mapped
    if protect == "block":
        assert isinstance(trap, (exits.MmioExit, exits.MemoryFaultExit))
        address = trap.phys_addr if isinstance(trap, exits.MmioExit) else trap.gpa
        assert address == plugged + dev.block_size
        assert dev.memdev.is_protected((bpm + 1) * dev.block_size, dev.block_size)
    else:
        assert (value, trap) == (0, None)

    value, trap = guest.read(dev.addr + 5 * dev.memslot_size)          # memslot 5 not mapped
    assert isinstance(trap, exits.MmioExit) and trap.phys_addr == dev.addr + 5 * dev.memslot_size
    assert value == 0xFFFFFFFFFFFFFFFF
    machine.close()


def test_kvm_refusing_a_memslot_answers_busy_and_rolls_back(vm) -> None:  # type: ignore[no-untyped-def]
    """A real KVM refusal: another slot already covers memslot 2's range."""
    machine = small_machine(vm)
    dev = plug_device(machine, requested_size=8 * GiB, protect="block")
    bpm = dev.memslot_size // dev.block_size
    assert request(dev, PLUG, 0, 2).type is ResponseType.ACK
    blocker = HostMemory(2 * MiB, "blocker")
    vm.set_user_memory_region(4000, dev.addr + 2 * dev.memslot_size, 2 * MiB, blocker.address)
    state = (dict(vm.memslots), dev.plugged_size, dev.mapped_memslots,
             dev.memdev.protected_ranges(), bytes(dev.bitmap._bits))  # type: ignore[union-attr]
    answer = request(dev, PLUG, 2 * bpm + 1, 1)
    assert answer.type is ResponseType.BUSY
    assert (dict(vm.memslots), dev.plugged_size, dev.mapped_memslots,
            dev.memdev.protected_ranges(), bytes(dev.bitmap._bits)) == state  # type: ignore[union-attr]
    vm.delete_memslot(4000)
    assert request(dev, PLUG, 2 * bpm + 1, 1).type is ResponseType.ACK
    assert request(dev, STATE, 2 * bpm + 1, 1).block_state is BlockState.PLUGGED
    assert dev.memdev.is_protected(2 * bpm * dev.block_size, dev.block_size)  # neighbour guarded
    machine.close()
    blocker.close()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_unplug_returns_memory_to_the_host(vm) -> None:  # type: ignore[no-untyped-def]
    machine = small_machine(vm)
    dev = plug_device(machine, requested_size=GiB)
    base = _rss()
    assert request(dev, PLUG, 0, 4).type is ResponseType.ACK        # 512 MiB
    dev.memdev.populate(0, 4 * dev.block_size)
    grown = _rss()
    assert grown - base >= 400 * MiB
    assert request(dev, UNPLUG, 0, 4).type is ResponseType.ACK
    assert _rss() - base < 16 * MiB
    machine.close()


def test_memslot_budget_shapes_and_refuses_devices(kvm) -> None:  # type: ignore[no-untyped-def]
    """Few free memslots give fewer, larger memslots; none refuses the
    device; reserved memslots are off limits to other users."""
    from kvmmem.devices.memory_device import MemoryDeviceError, MemslotBudgetError

    with kvm.create_vm() as vm:
        machine = small_machine(vm)
        filler = HostMemory(4096, "filler")
        slot = vm.max_memslots
        while vm.free_memslots > 3:
            slot -= 1
            vm.set_user_memory_region(slot, (1 << 40) + slot * 4096, 4096, filler.address)
        dev = VirtioMem(VirtioMemProps(id="a", memdev=HostMemory(8 * GiB, "mem-a"),
                                       block_size=128 * MiB))
        machine.plug(dev)
        assert dev.memslot_size == 8 * GiB            # 3 * 8/63 < 1: one memslot
        assert machine.budget.reservations["a"].reserved == 1
        assert machine.budget.available() == 2
        with pytest.raises(MemslotBudgetError):
            machine.budget.check_available("vhost", 3)
        vm.set_user_memory_region(slot - 1, (1 << 40), 4096, filler.address)
        vm.set_user_memory_region(slot - 2, (1 << 40) + 4096, 4096, filler.address)
        other = VirtioMem(VirtioMemProps(id="b", memdev=HostMemory(8 * GiB, "mem-b"),
                                         block_size=128 * MiB))
        with pytest.raises(MemoryDeviceError) as info:
            machine.plug(other)
        assert "memslots" in str(info.value)
        assert list(machine.devices) == ["a"] and len(machine.device_memory.devices) == 1
        machine.close()
        filler.close()


@pytest.mark.parametrize("mode", ["single", "usable", "dynamic", "exact"])
def test_budget_counts_device_memslots_by_listening(vm, mode: str) -> None:  # type: ignore[no-untyped-def]
    """The budget's used count follows the memslots KVM holds for the device,
    through requests, requested-size, a KVM refusal and unplug, without the
    device reporting anything."""
    machine = small_machine(vm)
    dev = plug_device(machine, requested_size=2 * GiB, memslots=mode)
    bpm = dev.memslot_size // dev.block_size

    def used() -> int:
        return machine.budget.reservations["vmem0"].used

    def check() -> None:
        assert used() == len(kvm_ranges(vm, dev)) == dev.nb_memslots

    check()
    assert request(dev, PLUG, 0, 2).type is ResponseType.ACK
    check()
    if mode != "single":
        blocker = HostMemory(2 * MiB, "blocker")
        blocked = 1 if mode in ("dynamic", "exact") else 5      # a memslot not mapped yet
        vm.set_user_memory_region(4000, dev.addr + blocked * dev.memslot_size, 2 * MiB,
                                  blocker.address)
        before = used()
        if mode in ("dynamic", "exact"):
            assert request(dev, PLUG, bpm, 1).type is ResponseType.BUSY
        else:
            with pytest.raises(ValueError):
                dev.set_requested_size(8 * GiB)
        assert used() == before
        vm.delete_memslot(4000)
        blocker.close()
        assert request(dev, PLUG, bpm, 1).type is ResponseType.ACK
        check()
    dev.set_requested_size(8 * GiB)
    check()
    assert request(dev, UNPLUG_ALL).type is ResponseType.ACK
    check()
    # A memslot of the device's RAM mapped by someone else counts as well.
    extra = dev.backing.top if mode != "single" else None  # type: ignore[union-attr]
    if extra is not None:
        from kvmmem.memory import MemoryRegion
        alias = MemoryRegion.alias("extra", dev.ram, 3 * dev.memslot_size, dev.memslot_size,
                                   unmergeable=True)
        extra.add_subregion(3 * dev.memslot_size, alias)
        assert used() == len(kvm_ranges(vm, dev))
        extra.del_subregion(alias)
    machine.unplug("vmem0")
    assert "vmem0" not in machine.budget.reservations
    machine.close()
