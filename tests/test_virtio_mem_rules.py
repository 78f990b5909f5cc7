"""One test per device rule of virtio-mem (VIRTIO 1.2, 5.15.6.2 Device Requirements)
and of its memslots (QEMU's virtio-mem.c, multiple memslots)."""

from __future__ import annotations

import pytest
from vmem_helpers import PLUG, STATE, UNPLUG, UNPLUG_ALL, GiB, MiB, kvm_ranges, plug_device, request, small_machine

from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_props import VirtioMemPropertyError, default_block_size
from kvmmem.devices.virtio_mem_proto import (
    VIRTIO_F_VERSION_1,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    BlockState,
    Config,
    Request,
    ResponseType,
)
from kvmmem.memory import HostMemory, MemoryListener

pytestmark = pytest.mark.kvm


@pytest.fixture
def machine(vm):  # type: ignore[no-untyped-def]
    m = small_machine(vm)
    yield m
    m.close()


@pytest.fixture
def dev(machine) -> VirtioMem:  # type: ignore[no-untyped-def]
    return plug_device(machine, requested_size=GiB)


def config(dev: VirtioMem) -> Config:
    return Config.parse(dev.read_config(0, 56))


def test_block_size_is_a_power_of_two_of_at_least_1_mib() -> None:
    for bad in (3 * MiB, 512 * 1024, 0x180000):
        with pytest.raises(VirtioMemPropertyError):
            VirtioMemProps(id="x", size=GiB, block_size=bad)
    assert VirtioMemProps(id="x", size=GiB, block_size=4 * MiB).block_size == 4 * MiB


def test_default_block_size_is_the_host_thp_size() -> None:
    with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
        assert default_block_size() == max(int(f.read()), MiB)
    assert VirtioMemProps(id="x", size=GiB).block_size == default_block_size()


def test_config_sizes_are_block_multiples(dev: VirtioMem) -> None:
    request(dev, PLUG, 0, 3)
    dev.set_requested_size(2 * GiB)
    cfg = config(dev)
    assert cfg.violations() == []
    for value in (cfg.addr, cfg.region_size, cfg.usable_region_size, cfg.plugged_size,
                  cfg.requested_size):
        assert value % cfg.block_size == 0


def test_requested_size_must_be_a_block_multiple_inside_the_region(dev: VirtioMem) -> None:
    for bad in (GiB + MiB, dev.region_size + dev.block_size, -dev.block_size):
        with pytest.raises(VirtioMemPropertyError):
            dev.set_requested_size(bad)
    assert dev.requested_size == GiB


def test_usable_region_is_requested_plus_256_mib_capped_at_region(dev: VirtioMem) -> None:
    assert dev.usable_region_size == GiB + 256 * MiB
    dev.set_requested_size(dev.region_size)
    assert dev.usable_region_size == dev.region_size
    assert dev.usable_region_size >= dev.requested_size


def test_usable_region_shrinks_only_on_unplug_all_or_system_reset(machine, dev: VirtioMem) -> None:  # type: ignore[no-untyped-def]
    dev.set_requested_size(4 * GiB)
    grown = dev.usable_region_size
    dev.set_requested_size(GiB)
    assert dev.usable_region_size == grown               # requested shrank: usable kept
    request(dev, PLUG, 0, 1)
    request(dev, UNPLUG, 0, 1)
    assert dev.usable_region_size == grown               # plain unplug keeps it too
    assert request(dev, UNPLUG_ALL).type is ResponseType.ACK
    assert dev.usable_region_size == GiB + 256 * MiB
    dev.set_requested_size(4 * GiB)
    dev.set_requested_size(0)
    machine.system_reset()
    assert dev.usable_region_size == 0


def test_config_change_notified_for_requested_and_usable_not_plugged(dev: VirtioMem) -> None:
    calls: list[int] = []
    dev.config_change_notifiers.add(lambda _: calls.append(1))
    request(dev, PLUG, 0, 2)
    assert calls == []                                   # plugged_size changed only
    dev.set_requested_size(2 * GiB)
    assert len(calls) == 1
    dev.set_requested_size(2 * GiB)
    assert len(calls) == 1                               # no change, no notification
    dev.set_requested_size(GiB)
    assert len(calls) == 2
    request(dev, UNPLUG_ALL)
    assert len(calls) == 3                               # usable region shrank
    request(dev, UNPLUG_ALL)
    assert len(calls) == 3                               # nothing changed


def test_size_change_callback_follows_plugged_size(dev: VirtioMem) -> None:
    sizes: list[int] = []
    dev.size_change_notifiers.add(sizes.append)
    request(dev, PLUG, 0, 2)
    request(dev, UNPLUG, 1, 1)
    request(dev, STATE, 0, 1)
    assert sizes == [2 * dev.block_size, dev.block_size]


def test_error_when_range_is_misaligned_empty_overflowing_or_outside_usable(dev: VirtioMem) -> None:
    usable_blocks = dev.usable_region_size // dev.block_size
    assert request(dev, PLUG, addr=dev.addr + MiB).type is ResponseType.ERROR
    assert request(dev, PLUG, 0, 0).type is ResponseType.ERROR
    assert request(dev, PLUG, addr=(1 << 64) - dev.block_size, n=2).type is ResponseType.ERROR
    assert request(dev, PLUG, usable_blocks, 1).type is ResponseType.ERROR
    assert request(dev, PLUG, addr=dev.addr - dev.block_size).type is ResponseType.ERROR
    assert request(dev, STATE, usable_blocks - 1, 2).type is ResponseType.ERROR
    assert dev.plugged_size == 0


def test_nack_when_plug_exceeds_requested_size(dev: VirtioMem) -> None:
    blocks = dev.requested_size // dev.block_size
    assert request(dev, PLUG, 0, blocks + 1).type is ResponseType.NACK
    assert request(dev, PLUG, 0, blocks).type is ResponseType.ACK
    assert request(dev, PLUG, blocks, 1).type is ResponseType.NACK


def test_range_check_comes_before_the_size_check(dev: VirtioMem) -> None:
    dev.set_requested_size(0)
    assert request(dev, PLUG, addr=dev.addr + MiB).type is ResponseType.ERROR


def test_error_when_a_block_is_already_in_the_target_state(dev: VirtioMem) -> None:
    assert request(dev, PLUG, 0, 2).type is ResponseType.ACK
    assert request(dev, PLUG, 1, 2).type is ResponseType.ERROR
    assert request(dev, UNPLUG, 1, 2).type is ResponseType.ERROR
    assert dev.plugged_size == 2 * dev.block_size


def test_ack_changes_plugged_size(dev: VirtioMem) -> None:
    assert request(dev, PLUG, 2, 3).type is ResponseType.ACK
    assert config(dev).plugged_size == 3 * dev.block_size
    assert request(dev, UNPLUG, 3, 1).type is ResponseType.ACK
    assert config(dev).plugged_size == 2 * dev.block_size


def test_state_reports_plugged_unplugged_and_mixed(dev: VirtioMem) -> None:
    request(dev, PLUG, 1, 1)
    assert request(dev, STATE, 1, 1).block_state is BlockState.PLUGGED
    assert request(dev, STATE, 2, 1).block_state is BlockState.UNPLUGGED
    assert request(dev, STATE, 0, 3).block_state is BlockState.MIXED


def test_unplug_all_acks_and_empties_the_device(vm, dev: VirtioMem) -> None:  # type: ignore[no-untyped-def]
    request(dev, PLUG, 0, 4)
    assert request(dev, UNPLUG_ALL).type is ResponseType.ACK
    assert dev.plugged_size == 0 and kvm_ranges(vm, dev) == set()
    assert request(dev, UNPLUG_ALL).type is ResponseType.ACK       # nothing plugged: still ACK


@pytest.mark.parametrize("raw", [b"", b"\x00" * 23, b"\x09\x00" + b"\x00" * 22])
def test_malformed_request_needs_reset_instead_of_an_answer(dev: VirtioMem, raw: bytes) -> None:
    assert dev.handle(0, raw, 10) is None
    assert dev.needs_reset
    dev.reset()
    assert not dev.needs_reset


def test_too_short_response_buffer_needs_reset(dev: VirtioMem) -> None:
    assert dev.handle(0, Request(PLUG, dev.addr, 1).pack(), 9) is None
    assert dev.needs_reset and dev.plugged_size == 0


def test_device_reset_keeps_block_state(dev: VirtioMem) -> None:
    request(dev, PLUG, 0, 3)
    dev.reset()
    assert dev.plugged_size == 3 * dev.block_size
    assert request(dev, STATE, 0, 3).block_state is BlockState.PLUGGED


def test_system_reset_unplugs_everything(vm, machine, dev: VirtioMem) -> None:  # type: ignore[no-untyped-def]
    request(dev, PLUG, 0, 3)
    machine.system_reset()
    assert dev.plugged_size == 0 and kvm_ranges(vm, dev) == set()
    assert request(dev, STATE, 0, 3).block_state is BlockState.UNPLUGGED


def test_plugged_memory_is_never_modified_by_the_device(dev: VirtioMem) -> None:
    dev.set_requested_size(dev.region_size)
    request(dev, PLUG, 8, 1)
    pattern = b"kvmmem!!"
    dev.memdev.write(8 * dev.block_size, pattern)
    for block in (0, 9, 7, 40):
        request(dev, PLUG, block, 1)
    for block in (0, 9, 40):
        request(dev, UNPLUG, block, 1)
    dev.set_requested_size(GiB)
    assert dev.memdev.read(8 * dev.block_size, 8) == pattern


def test_features_offer_version_1_and_unplugged_inaccessible(dev: VirtioMem) -> None:
    version, inaccessible = 1 << VIRTIO_F_VERSION_1, 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    assert dev.device_features() == version | inaccessible
    assert not dev.set_driver_features(version)                  # must accept inaccessible
    assert not dev.set_driver_features(inaccessible)             # must accept VERSION_1
    assert not dev.set_driver_features(version | inaccessible | 1 << 5)
    assert dev.set_driver_features(version | inaccessible)


def test_protect_block_is_refused_in_single_mode() -> None:
    with pytest.raises(VirtioMemPropertyError) as info:
        VirtioMemProps(id="x", size=GiB, memslots="single", protect="block")
    assert "memslots=usable" in str(info.value)


def test_dynamic_mode_requires_unplugged_inaccessible() -> None:
    with pytest.raises(VirtioMemPropertyError):
        VirtioMemProps(id="x", size=GiB, memslots="dynamic", unplugged_inaccessible=False)
    props = VirtioMemProps(id="x", size=GiB, memslots="usable", unplugged_inaccessible=False)
    assert VirtioMem(props).device_features() == 1 << VIRTIO_F_VERSION_1


class _OrderProbe(MemoryListener):
    """Records, at each memslot change, whether a block's host page is accessible."""

    def __init__(self, dev: VirtioMem, block: int) -> None:
        self.dev, self.block, self.seen = dev, block, []

    def region_add(self, fr) -> None:  # type: ignore[no-untyped-def]
        offset, memdev = self.block * self.dev.block_size, self.dev.memdev
        guarded = memdev.is_protected(offset, self.dev.block_size)
        self.seen.append(("add", guarded, None if guarded else memdev.read(offset, 8)))

    def region_del(self, fr) -> None:  # type: ignore[no-untyped-def]
        self.region_add(fr)
        self.seen[-1] = ("del",) + self.seen[-1][1:]


def test_plug_makes_memory_accessible_before_the_memslot_and_unplug_deletes_it_first(machine) -> None:  # type: ignore[no-untyped-def]
    dev = plug_device(machine, requested_size=GiB, protect="block")
    bpm = dev.memslot_size // dev.block_size
    request(dev, PLUG, 0, 1)                                    # memslot 0 mapped, block 1 guarded
    assert dev.memdev.is_protected(dev.block_size, dev.block_size)
    probe = _OrderProbe(dev, 1)
    machine.address_space.add_listener(probe)
    probe.seen.clear()
    dev.set_requested_size(2 * GiB)
    request(dev, PLUG, bpm, 1)                                  # maps memslot 1
    assert probe.seen[-1][0] == "add"
    dev.memdev.write(bpm * dev.block_size, b"pattern!")
    probe.block = bpm
    request(dev, UNPLUG, bpm, 1)                                # unmaps memslot 1
    assert probe.seen[-1] == ("del", False, b"pattern!")        # deleted before discard
    assert dev.memdev.read(bpm * dev.block_size, 8) == bytes(8)  # then discarded
    probe.block = 1
    request(dev, PLUG, 1, 1)                                    # no memslot change for block 1
    assert not dev.memdev.is_protected(dev.block_size, dev.block_size)
    machine.address_space.remove_listener(probe)


def test_protect_block_guards_exactly_the_unplugged_blocks_of_mapped_memslots(machine) -> None:  # type: ignore[no-untyped-def]
    dev = plug_device(machine, requested_size=2 * GiB, protect="block")
    bpm = dev.memslot_size // dev.block_size
    request(dev, PLUG, 2, 2)
    block = dev.block_size
    assert dev.memdev.protected_ranges() == [(0, 2 * block), (4 * block, (bpm - 4) * block)]
    request(dev, UNPLUG, 2, 2)                                  # memslot 0 unmapped: no guards
    assert dev.memdev.protected_ranges() == []


def test_a_device_plugs_into_a_machine_only_with_device_memory(vm) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.devices.memory_device import MemoryDeviceError
    from kvmmem.vmm.machine_memory import MachineMemory

    machine = MachineMemory(vm, GiB)
    dev = VirtioMem(VirtioMemProps(id="x", memdev=HostMemory(GiB, "m"), block_size=128 * MiB))
    with pytest.raises(MemoryDeviceError) as info:
        machine.plug(dev)
    assert "maxmem" in str(info.value) and not dev.realized
    machine.close()
