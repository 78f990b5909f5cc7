"""What a machine refuses to plug, and leaves as it was: a memory backend
another device uses, a device (or a requested-size) whose memslots would
cost more KVM metadata than the machine allows."""

from __future__ import annotations

from typing import Any

import pytest
from vmem_helpers import GiB, MiB, PLUG, request, small_machine

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
