"""What a machine refuses to plug, and leaves as it was: a memory backend
another device uses, a device (or a requested-size) whose memslots would
cost more KVM metadata than the machine allows."""

from __future__ import annotations

from typing import Any

import pytest
from vmem_helpers import PLUG, GiB, MiB, request, small_machine

from kvmmem.devices.memory_device import MemoryDeviceError
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.memory import HostMemory


def _state(machine: Any) -> tuple[Any, ...]:
    """Everything a refused plug must leave alone."""
    return (sorted(machine.devices), machine.device_memory.devices,
            sorted((r.slot, r.guest_phys_addr, r.memory_size)
                   for r in machine.kvm_listener.memslots()),
            machine.budget.available(), machine.info_mtree())


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["single", "usable", "dynamic"])
def test_a_memory_backend_in_use_is_refused_and_nothing_changes(vm: Any, mode: str) -> None:
    machine = small_machine(vm)
    mem = HostMemory(4 * GiB, "mem0")
    first = VirtioMem(VirtioMemProps(id="vmem0", memdev=mem, requested_size=256 * MiB,
                                     block_size=128 * MiB, memslots=mode))
    machine.plug(first)
    assert request(first, PLUG, 0, 2).type.name == "ACK"
    mem.write(0, b"kvmmem!!")
    before = _state(machine)
    second = VirtioMem(VirtioMemProps(id="vmem1", memdev=mem, requested_size=256 * MiB,
                                      block_size=128 * MiB, memslots=mode))
    with pytest.raises(MemoryDeviceError) as info:
        machine.plug(second)
    assert str(info.value) == ("vmem1: 'memdev' property specifies a busy memdev: mem0 "
                               "(already in use by vmem0)")
    assert _state(machine) == before and not second.realized
    assert first.plugged_size == 256 * MiB and mem.read(0, 8) == b"kvmmem!!"
    machine.unplug("vmem0")                # once free, the backend can be used again
    machine.plug(second)
    assert sorted(machine.devices) == ["vmem1"]
    machine.close()
    mem.close()


def test_the_command_line_refuses_a_busy_memdev() -> None:
    from kvmmem.vmm.cli import OptionError, parse_args, parse_machine

    argv = ["-kernel", "k", "-m", "1G,maxmem=9G", "-object", "memory-backend-ram,id=mem0,size=1G",
            "-device", "virtio-mem,id=v0,memdev=mem0", "-device", "virtio-mem,id=v1,memdev=mem0"]
    with pytest.raises(OptionError) as info:
        parse_machine(parse_args(argv), None)
    assert str(info.value) == "-device: 'memdev' property specifies a busy memdev: mem0"


@pytest.mark.kvm
def test_a_node_the_machine_does_not_have_is_refused_and_nothing_changes(vm: Any) -> None:
    """The pc machine has one NUMA node; QEMU's virtio_mem_device_realize()
    refuses a 'node' beyond the machine's nodes (the guest would be told to
    add the memory to a node it does not have)."""
    machine = small_machine(vm)
    before = _state(machine)
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(GiB, "mem0"), node=5))
    with pytest.raises(MemoryDeviceError) as info:
        machine.plug(dev)
    assert str(info.value) == ("vmem0: 'node' property has value '5', which exceeds the number "
                               "of numa nodes: 1")
    assert _state(machine) == before and not dev.realized
    machine.close()


# -- KVM metadata admission (issue 13, "Also") -------------------------------------

def test_the_estimate_follows_the_mode() -> None:
    from kvmmem.devices.memslot_policy import MemslotMode
    from kvmmem.vmm.memslot_metadata import device_estimate, metadata_estimate

    TiB = 1 << 40
    # One 1 TiB memslot: 2560 MiB + 20 KiB (measured here: 2566 MiB).
    assert metadata_estimate(TiB, 1) == 2560 * MiB + 20 * 1024
    single = device_estimate(MemslotMode.SINGLE, TiB, 2 * MiB, TiB, 0)
    assert single == (2560 * MiB + 20 * 1024, TiB, 1)
    # usable: the memslots over requested-size plus the usable extent.
    usable = device_estimate(MemslotMode.USABLE, TiB, 2 * MiB, GiB, 16 * GiB)
    assert usable[1:] == (17 * GiB, 17) and usable[0] == metadata_estimate(17 * GiB, 17)
    assert device_estimate(MemslotMode.USABLE, TiB, 2 * MiB, GiB, 0, usable_now=4 * GiB)[1:] == \
        (4 * GiB, 4)                          # the usable region does not shrink on a resize
    # dynamic: requested-size's worth of memslots, nothing when nothing is requested.
    assert device_estimate(MemslotMode.DYNAMIC, TiB, 2 * MiB, GiB, 5 * GiB + 2 * MiB)[1:] == \
        (6 * GiB, 6)
    assert device_estimate(MemslotMode.DYNAMIC, TiB, 2 * MiB, GiB, 0) == (0, 0, 0)


def test_the_default_limit_is_a_quarter_of_memtotal(tmp_path: Any) -> None:
    from kvmmem.vmm.memslot_metadata import default_limit

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24731708 kB\nMemFree:  1 kB\n")
    assert default_limit(meminfo) == 24731708 * 1024 // 4


def _device(dev_id: str, size: int, mode: str, requested: int = 0) -> VirtioMem:
    return VirtioMem(VirtioMemProps(id=dev_id, memdev=HostMemory(size, f"mem-{dev_id}"),
                                    requested_size=requested, block_size=128 * MiB,
                                    memslots=mode))


@pytest.mark.kvm
@pytest.mark.parametrize("mode,requested", [("single", 0), ("usable", 48 * GiB)])
def test_a_device_over_the_metadata_limit_is_refused_and_nothing_changes(
        vm: Any, mode: str, requested: int) -> None:
    from kvmmem.vmm.machine_memory import MachineMemory

    machine = MachineMemory(vm, GiB, maxmem=129 * GiB, metadata_limit=100 * MiB)
    small = _device("small", 8 * GiB, mode, requested=0)
    machine.plug(small)                                  # 20 MiB (single) or 0 (usable)
    before = _state(machine)
    big = _device("big", 64 * GiB, mode, requested)      # 160 MiB, or 49 GiB usable: 122.5
    with pytest.raises(MemoryDeviceError, match="exceeds memslot-metadata-limit=100.0 MiB"):
        machine.plug(big)
    assert _state(machine) == before and not big.realized
    big.memdev.close()
    machine.close()
    small.memdev.close()


@pytest.mark.kvm
def test_the_limit_counts_every_device(vm: Any) -> None:
    from kvmmem.vmm.machine_memory import MachineMemory

    machine = MachineMemory(vm, GiB, maxmem=129 * GiB, metadata_limit=100 * MiB)
    first = _device("first", 24 * GiB, "single")          # 60 MiB: fits
    machine.plug(first)
    second = _device("second", 24 * GiB, "single")        # 60 more: 120 > 100
    with pytest.raises(MemoryDeviceError, match="other devices' 60.0 MiB"):
        machine.plug(second)
    assert sorted(machine.devices) == ["first"]
    machine.unplug("first")
    machine.plug(second)                                  # alone it fits
    machine.close()
    first.memdev.close()
    second.memdev.close()


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["usable", "dynamic"])
def test_a_requested_size_over_the_metadata_limit_is_refused_and_nothing_changes(
        vm: Any, mode: str) -> None:
    from kvmmem.devices.virtio_mem_props import VirtioMemPropertyError
    from kvmmem.vmm.machine_memory import MachineMemory

    machine = MachineMemory(vm, GiB, maxmem=129 * GiB, metadata_limit=100 * MiB)
    dev = _device("vmem0", 64 * GiB, mode)
    machine.plug(dev)
    dev.set_requested_size(16 * GiB)                      # about 40 MiB: fits
    assert request(dev, PLUG, 0, 4).type.name == "ACK"
    before = (_state(machine), dev.properties())
    with pytest.raises(VirtioMemPropertyError, match="requested-size 0x1000000000 would map") as info:
        dev.set_requested_size(64 * GiB)                  # 160 MiB
    # the way out the message offers is one this device has not taken already
    assert ("use memslots=dynamic" in str(info.value)) == (mode != "dynamic"), str(info.value)
    assert (_state(machine), dev.properties()) == before
    dev.set_requested_size(8 * GiB)                       # smaller is always fine
    assert dev.requested_size == 8 * GiB
    machine.close()
    dev.memdev.close()


@pytest.mark.kvm
def test_a_16_tib_usable_device_is_refused_under_the_default_limit(vm: Any) -> None:
    """The issue's case: 16 TiB requested in usable mode asks for about
    40 GiB of kernel memory, beyond a quarter of this host's memory."""
    from kvmmem.vmm.machine_memory import MachineMemory
    from kvmmem.vmm.memslot_metadata import default_limit

    TiB = 1 << 40
    assert default_limit() < 40 * GiB, "a host with 160 GiB or more would take this device"
    machine = MachineMemory(vm, GiB, maxmem=17 * TiB)
    dev = VirtioMem(VirtioMemProps(id="huge", memdev=HostMemory(16 * TiB, "huge-mem"),
                                   requested_size=16 * TiB, memslots="usable"))
    with pytest.raises(MemoryDeviceError, match="map 16384 GiB in 1024 memslot.s., about 40980.0 MiB of KVM metadata"):
        machine.plug(dev)
    assert not machine.devices and not dev.realized
    machine.close()
    dev.memdev.close()


def test_the_dynamic_estimate_bounds_what_the_guest_can_map() -> None:
    from kvmmem.devices.memslot_policy import MemslotMode
    from kvmmem.vmm.memslot_metadata import device_estimate

    TiB = 1 << 40
    # 64 GiB memslots, 64 GiB - 128 MiB requested: the usable region (+256 MiB)
    # reaches into the second memslot, and the guest has blocks for both
    est = device_estimate(MemslotMode.DYNAMIC, TiB, 128 * MiB, 64 * GiB, 64 * GiB - 128 * MiB)
    assert est[1:] == (128 * GiB, 2)                   # (64 GiB, 1) before
    # anywhere in the usable region (it stays 8 GiB after a shrink), but never
    # more memslots than blocks to plug, each in its own memslot
    assert device_estimate(MemslotMode.EXACT, TiB, 2 * MiB, GiB, 4 * MiB,
                           usable_now=8 * GiB)[1:] == (2 * GiB, 2)
    # what the guest keeps mapped counts, whatever is requested now
    assert device_estimate(MemslotMode.DYNAMIC, TiB, 2 * MiB, GiB, GiB,
                           mapped_now=(8 * GiB, 8))[1:] == (8 * GiB, 8)


@pytest.mark.kvm
def test_a_guest_plugging_at_the_end_of_the_usable_region_stays_within_the_limit(vm: Any) -> None:
    """The guest may plug the last block of the usable region: with 64 GiB
    memslots that is a second memslot (320 MiB) under a 200 MiB limit, which
    the requested-size alone (one memslot, 160 MiB) did not show."""
    from kvmmem.devices.virtio_mem_props import VirtioMemPropertyError
    from kvmmem.vmm.machine_memory import MachineMemory
    from kvmmem.vmm.memslot_metadata import metadata_estimate

    TiB = 1 << 40
    machine = MachineMemory(vm, GiB, maxmem=TiB + GiB, metadata_limit=200 * MiB)
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(TiB, "mem0"),
                                   block_size=128 * MiB, memslots="dynamic", max_memslots=16))
    machine.plug(dev)
    assert dev.memslot_size == 64 * GiB
    with pytest.raises(VirtioMemPropertyError, match="would map 128 GiB in 2 memslot"):
        dev.set_requested_size(64 * GiB - 128 * MiB)   # admitted before
    dev.set_requested_size(64 * GiB - 512 * MiB)       # the usable region ends in memslot 0
    last = dev.usable_region_size // dev.block_size - 1
    assert request(dev, PLUG, 0, 1).type.name == "ACK"
    assert request(dev, PLUG, last, 1).type.name == "ACK"
    mapped = sum(span.size for span in dev.policy.mapped)      # type: ignore[union-attr]
    assert metadata_estimate(mapped, dev.nb_memslots) <= 200 * MiB
    machine.close()
    dev.memdev.close()


@pytest.mark.kvm
def test_a_guest_ignoring_a_shrink_still_counts_what_it_maps(vm: Any) -> None:
    from kvmmem.vmm.machine_memory import MachineMemory

    machine = MachineMemory(vm, GiB, maxmem=33 * GiB, metadata_limit=30 * MiB)
    first = _device("first", 16 * GiB, "dynamic", requested=8 * GiB)   # 8 memslots: 20 MiB
    machine.plug(first)
    assert request(first, PLUG, 0, 64).type.name == "ACK"              # the guest plugs 8 GiB
    first.set_requested_size(GiB)            # ... and ignores the shrink: 8 GiB stay mapped
    assert first.nb_memslots == 8
    second = _device("second", 16 * GiB, "dynamic", requested=8 * GiB)
    with pytest.raises(MemoryDeviceError, match="other devices' 20.2 MiB"):
        machine.plug(second)                 # admitted before: 5 MiB counted for the first
    assert sorted(machine.devices) == ["first"]
    machine.close()
    first.memdev.close()
    second.memdev.close()
