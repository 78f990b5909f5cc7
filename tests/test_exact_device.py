"""memslots=exact in a device on real KVM: merges, splits, refusals, the budget fallback.

Most tests merge on the request path (``merge-delay=0``); the deferred ones
run :meth:`VirtioMem.merge_memslots` themselves, as the VMM's merge thread does.
"""

from __future__ import annotations

import errno
import gc
import logging

import pytest
from vmem_helpers import PLUG, UNPLUG, UNPLUG_ALL, GiB, MiB, exact_ranges, kvm_ranges, plug_device, request

from kvmmem.devices.virtio_mem_proto import ResponseType
from kvmmem.memory import HostMemory
from kvmmem.memory.address_space import MemoryListener
from kvmmem.memory.flatview import FlatRange
from kvmmem.vmm.machine_memory import MachineMemory

pytestmark = pytest.mark.kvm

BS = 2 * MiB
STEP = 128 * MiB // BS


def machine_with_device(vm, size: int = 16 * GiB, merge_delay: int = 0,  # type: ignore[no-untyped-def]
                        **props):
    machine = MachineMemory(vm, GiB, maxmem=size + 4 * GiB)
    dev = plug_device(machine, size=size, block=BS, memslots="exact", requested_size=size,
                      merge_delay=merge_delay, **props)
    return machine, dev


class RefusingListener(MemoryListener):
    """Fault injection in the memory layer (KVM stays real): refuses to map
    a range of ``size`` bytes, as a vhost back-end out of memory would."""

    def __init__(self, start: int, size: int) -> None:
        self.start, self.size = start, size

    def region_add(self, fr: FlatRange) -> None:
        if fr.start >= self.start and fr.size == self.size:
            raise OSError(errno.ENOMEM, f"refusing a {fr.size:#x}-byte range")


def test_deferred_merges_wait_for_merge_memslots(vm) -> None:  # type: ignore[no-untyped-def]
    machine, dev = machine_with_device(vm, merge_delay=100)
    notified: list[None] = []
    dev.merge_notifiers.append(notified.append)
    for k in range(7):
        assert request(dev, PLUG, k * STEP, STEP).type is ResponseType.ACK
    assert not dev.merges_pending and not notified          # nothing could merge yet
    assert request(dev, PLUG, 7 * STEP, STEP).type is ResponseType.ACK
    # the eighth 128 MiB got a memslot of its own; the 1 GiB merge waits
    assert kvm_ranges(vm, dev) == {(dev.addr + k * 128 * MiB, 128 * MiB) for k in range(8)}
    assert dev.merges_pending and len(notified) == 1
    assert dev.merge_memslots() is True
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB)} == exact_ranges(dev)
    assert not dev.merges_pending and dev.merge_memslots() is False
    assert machine.budget.reservations["vmem0"].used == 1
    machine.close()


def test_a_burst_merges_straight_into_the_largest_chunk(vm) -> None:  # type: ignore[no-untyped-def]
    """64 plugs of 128 MiB, then one merge: one 8 GiB memslot, no 1 GiB one
    made on the way (each byte's metadata allocated twice, not three times)."""
    machine, dev = machine_with_device(vm, size=64 * GiB, merge_delay=100)   # a budget of 64
    made: list[int] = []
    machine.address_space.add_listener(_Recorder(dev.addr, made))
    for k in range(64):
        assert request(dev, PLUG, k * STEP, STEP).type is ResponseType.ACK
    assert len(kvm_ranges(vm, dev)) == 64
    assert dev.merge_memslots()
    assert kvm_ranges(vm, dev) == {(dev.addr, 8 * GiB)} == exact_ranges(dev)
    assert sorted(set(made)) == [128 * MiB, 8 * GiB] and made.count(8 * GiB) == 1
    machine.close()


def test_merges_one_group_at_a_time(vm) -> None:  # type: ignore[no-untyped-def]
    machine, dev = machine_with_device(vm, size=256 * GiB, merge_delay=100)  # a budget of 256
    for k in range(128):                                    # 16 GiB in 128 MiB steps
        assert request(dev, PLUG, k * STEP, STEP).type is ResponseType.ACK
    assert dev.merge_memslots(one_group=True) is True
    assert (dev.addr, 8 * GiB) in kvm_ranges(vm, dev) and len(kvm_ranges(vm, dev)) == 1 + 64
    assert dev.merges_pending
    assert dev.merge_memslots(one_group=True) is True
    assert kvm_ranges(vm, dev) == {(dev.addr, 8 * GiB), (dev.addr + 8 * GiB, 8 * GiB)}
    assert not dev.merges_pending and dev.merge_memslots(one_group=True) is False
    machine.close()


def test_a_refused_deferred_merge_changes_nothing_and_stays_pending(vm, caplog) -> None:  # type: ignore[no-untyped-def]
    machine, dev = machine_with_device(vm, size=64 * GiB, merge_delay=100)   # a budget of 64
    for k in range(8):
        assert request(dev, PLUG, k * STEP, STEP).type is ResponseType.ACK
    before = (kvm_ranges(vm, dev), dev.policy.cover.spans(), dict(vm.memslots))
    refusing = RefusingListener(dev.addr, GiB)
    machine.address_space.add_listener(refusing)
    with caplog.at_level(logging.WARNING, logger="kvmmem.devices.virtio_mem"):
        assert dev.merge_memslots() is False
    assert "deferred memslot merge failed, memslots left as they were" in caplog.text
    assert (kvm_ranges(vm, dev), dev.policy.cover.spans(), dict(vm.memslots)) == before
    assert dev.merges_pending
    # the guest goes on: unplug a block inside, plug it back
    assert request(dev, UNPLUG, 3, 1).type is ResponseType.ACK
    assert request(dev, PLUG, 3, 1).type is ResponseType.ACK
    machine.address_space.remove_listener(refusing)
    assert dev.merge_memslots() is True
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB)} == exact_ranges(dev)
    machine.close()


def test_a_deferred_plug_over_the_budget_merges_first(vm) -> None:  # type: ignore[no-untyped-def]
    """4 GiB device: a budget of 4 memslots. Lazy 128 MiB chunks would need
    more; the plug that would go over merges what was deferred instead."""
    machine, dev = machine_with_device(vm, size=4 * GiB, merge_delay=100)
    for k in range(4):
        assert request(dev, PLUG, k * STEP, STEP).type is ResponseType.ACK
    assert len(kvm_ranges(vm, dev)) == 4
    assert request(dev, PLUG, 4 * STEP, 4 * STEP).type is ResponseType.ACK   # completes 1 GiB
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB)} == exact_ranges(dev)
    assert not dev.merges_pending
    assert machine.budget.reservations["vmem0"].used == 1
    machine.close()


class _Recorder(MemoryListener):
    """The size of every range mapped from ``start`` on."""

    def __init__(self, start: int, sizes: list[int]) -> None:
        self.start, self.sizes = start, sizes

    def region_add(self, fr: FlatRange) -> None:
        if fr.start >= self.start:
            self.sizes.append(fr.size)


def test_a_refused_merge_leaves_everything_as_it_was(vm) -> None:  # type: ignore[no-untyped-def]
    machine, dev = machine_with_device(vm)
    for k in range(7):
        assert request(dev, PLUG, k * STEP, STEP).type is ResponseType.ACK
    before = (kvm_ranges(vm, dev), dev.plugged_size, dev.policy.cover.spans(), dict(vm.memslots))
    assert len(before[0]) == 7
    # someone else's memslot where the eighth 128 MiB would go: KVM refuses the 1 GiB merge
    blocker = HostMemory(BS, "blocker")
    where = dev.addr + 7 * 128 * MiB + 64 * MiB
    vm.set_user_memory_region(4000, where, BS, blocker.address)
    assert request(dev, PLUG, 7 * STEP, STEP).type is ResponseType.BUSY
    others = {k: v for k, v in vm.memslots.items() if k != 4000}
    after = (kvm_ranges(vm, dev) - {(where, BS)}, dev.plugged_size, dev.policy.cover.spans(), others)
    assert after == before
    assert dev.bitmap.find(True, 7 * STEP, 8 * STEP) == -1
    vm.delete_memslot(4000)
    blocker.close()
    assert request(dev, PLUG, 7 * STEP, STEP).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB)} == exact_ranges(dev)
    machine.close()


def test_a_refused_split_leaves_everything_as_it_was(vm) -> None:  # type: ignore[no-untyped-def]
    machine, dev = machine_with_device(vm, size=64 * GiB)     # a budget of 64: the split fits it
    assert request(dev, PLUG, 0, 8 * STEP).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB)}
    # all memslots of KVM taken: the split's pieces cannot be created
    fillers = []
    host = HostMemory(BS, "filler")
    while vm.free_memslots > 1:
        fillers.append(vm.add_memslot((1 << 40) + len(fillers) * BS, BS, host.address))
    assert request(dev, UNPLUG, 100, 1).type is ResponseType.BUSY
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB)} and dev.plugged_size == GiB
    for slot in fillers:
        vm.delete_memslot(slot)
    host.close()
    assert request(dev, UNPLUG, 100, 1).type is ResponseType.ACK
    # [0, 100): 1 x 128 MiB, 4 x 16 MiB, 4 x 2 MiB; [101, 512): 3 x 2 MiB, 3 x 16 MiB, 6 x 128 MiB
    assert kvm_ranges(vm, dev) == exact_ranges(dev) and len(exact_ranges(dev)) == 9 + 12
    machine.close()


def test_the_budget_fallback_maps_whole_grid_memslots_and_logs_it(vm, caplog) -> None:  # type: ignore[no-untyped-def]
    machine, dev = machine_with_device(vm, size=4 * GiB, protect="block")   # 4 memslots
    with caplog.at_level(logging.WARNING, logger="kvmmem.devices.memslot_policy"):
        for b in (0, 2, 4, 6):
            assert request(dev, PLUG, b, 1).type is ResponseType.ACK
        assert request(dev, PLUG, 512, 1).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == {(dev.addr, GiB), (dev.addr + GiB, BS)} == exact_ranges(dev)
    assert "would need more than its 4 memslots: grid memslot(s) 0 mapped whole" in caplog.text
    # inside the whole memslot the unplugged blocks are guarded, outside none is
    assert dev.protection.guarded(1, 1) and dev.protection.guarded(7, 500)
    assert not dev.protection.guarded(513, 1)
    assert machine.budget.reservations["vmem0"].used == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvmmem.devices.memslot_policy"):
        assert request(dev, UNPLUG, 2, 1).type is ResponseType.ACK     # 3 + 1 <= 4: exact again
    assert "back to exact memslots in grid memslot(s) 0" in caplog.text
    assert kvm_ranges(vm, dev) == {(dev.addr + b * BS, BS) for b in (0, 4, 6, 512)} == exact_ranges(dev)
    assert not dev.protection.guarded(1, 1)
    assert request(dev, UNPLUG_ALL).type is ResponseType.ACK
    assert kvm_ranges(vm, dev) == set() and machine.budget.reservations["vmem0"].used == 0
    machine.close()


def test_unmapped_aliases_are_not_kept(vm) -> None:  # type: ignore[no-untyped-def]
    """Each exact memslot is an alias region of its own size and offset; one
    no longer mapped is dropped, so that a long-running guest's plugs and
    unplugs do not pile up regions (800 distinct spans here)."""
    machine, dev = machine_with_device(vm, size=64 * GiB)
    for b in range(0, 2000, 10):
        assert request(dev, PLUG, b, 1 + b % 7).type is ResponseType.ACK
        assert request(dev, UNPLUG, b, 1 + b % 7).type is ResponseType.ACK
    assert request(dev, PLUG, 0, STEP).type is ResponseType.ACK
    assert dev.backing.nb_aliases == dev.nb_memslots == 1
    gc.collect()             # a region and its cached rendering refer to each other
    # alive: the mapped alias, and at most the one the RAM region last rendered through
    assert len(dev.ram._aliased_by) <= 2
    machine.close()


def test_a_guest_plugging_at_the_budget_edge_is_logged_rate_limited(vm, caplog) -> None:  # type: ignore[no-untyped-def]
    # 2 GiB in 1 GiB memslots: exact may map 2 memslots. Blocks 0 and 2 are two
    # runs; a third (block 4) coarsens grid memslot 0, unplugging it refines it.
    machine, dev = machine_with_device(vm, size=2 * GiB)
    policy = dev.policy
    frozen = [0.0]
    policy.coarsen_log.clock = policy.refine_log.clock = lambda: frozen[0]
    assert request(dev, PLUG, 0, 1).type is ResponseType.ACK
    assert request(dev, PLUG, 2, 1).type is ResponseType.ACK
    caplog.set_level(logging.INFO, logger="kvmmem.devices.memslot_policy")
    for _ in range(50):
        assert request(dev, PLUG, 4, 1).type is ResponseType.ACK
        assert dev.mapped_memslots == frozenset({0}) and dev.nb_memslots == 1     # coarse
        assert request(dev, UNPLUG, 4, 1).type is ResponseType.ACK
        assert dev.nb_memslots == 2                                               # exact again
    lines = [r.getMessage() for r in caplog.records if "memslots=exact" in r.getMessage()]
    # one line of each kind within the interval, not one per two requests
    assert len(lines) == 2, lines
    frozen[0] = 10.0
    assert request(dev, PLUG, 4, 1).type is ResponseType.ACK
    assert "(49 more not logged since the last such line)" in caplog.records[-1].getMessage()
    machine.close()
