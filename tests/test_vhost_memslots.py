"""A vhost-user back-end follows the memslots, and the budget respects its limit.

Real KVM, a real qemu-storage-daemon (libvhost-user: 32 memory slots in QEMU
7.2, 509 later); the messages are counted from the front-end's side.
"""

from __future__ import annotations

import re

import pytest
from vhost_helpers import GiB, MiB, start_backend

from kvmmem.devices.memslot_budget import memslots_for_device
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
from kvmmem.memory import HostMemory
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.vhost.backends import VhostBackends
from kvmmem.vhost.frontend import (
    SUPPORTED_PROTOCOL_FEATURES,
    VhostUserError,
    VhostUserFrontend,
)
from kvmmem.vhost.mem_listener import VhostMemoryListener
from kvmmem.vhost.messages import ProtocolFeature
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.vmm.machine_memory import MachineMemory

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]

BLOCK = 128 * MiB


@pytest.fixture
def backend(tmp_path):  # type: ignore[no-untyped-def]
    b = start_backend(tmp_path)
    yield b
    b.kill()


def machine(vm, maxmem: int = 64 * GiB) -> MachineMemory:  # type: ignore[no-untyped-def]
    return MachineMemory(vm, 1 * GiB, maxmem=maxmem, ram_host=HostMemory(GiB, "pc.ram", shared=True))


def device(size: int, mode: str, requested: int = 0, dev_id: str = "vmem0") -> VirtioMem:
    return VirtioMem(VirtioMemProps(id=dev_id, memdev=HostMemory(size, f"mem-{dev_id}", shared=True),
                                    block_size=BLOCK, memslots=mode, requested_size=requested))


def send(dev: VirtioMem, type: RequestType, block: int = 0, n: int = 1) -> str:
    raw = dev.handle(0, Request(type, dev.addr + block * dev.block_size, n).pack(), 10)
    assert raw is not None
    return Response.parse(raw).type.name


def kvm_ram(vm) -> set[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return {(s.guest_phys_addr, s.memory_size) for s in vm.memslots.values()}


def mirrored(listener: VhostMemoryListener) -> set[tuple[int, int]]:
    return {(r.desc.guest_phys_addr, r.desc.size) for r in listener.regions()}


def counts(frontend: VhostUserFrontend) -> tuple[int, int]:
    return frontend.sent["ADD_MEM_REG"], frontend.sent["REM_MEM_REG"]


def test_dynamic_one_add_per_mapped_memslot_one_rem_per_unmapped(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm)
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    dev = device(16 * GiB, "dynamic", requested=16 * GiB)
    mem.plug(dev)
    per_slot = dev.memslot_size // BLOCK
    assert counts(b.frontend) == (1, 0)                 # boot RAM only
    assert send(dev, RequestType.PLUG, 0) == "ACK"          # maps memslot 0
    assert counts(b.frontend) == (2, 0)
    assert send(dev, RequestType.PLUG, 1) == "ACK"          # same memslot: nothing new
    assert send(dev, RequestType.PLUG, per_slot) == "ACK"   # the neighbour: one more, no remap
    assert send(dev, RequestType.PLUG, 3 * per_slot) == "ACK"
    assert counts(b.frontend) == (4, 0)
    assert mirrored(b.listener) == kvm_ram(vm)              # unmergeable: three separate regions
    assert len(b.listener.regions()) == 4
    assert send(dev, RequestType.UNPLUG, 0) == "ACK"        # memslot 0 still holds block 1
    assert counts(b.frontend) == (4, 0)
    assert send(dev, RequestType.UNPLUG, 1) == "ACK"
    assert counts(b.frontend) == (4, 1)
    assert send(dev, RequestType.UNPLUG_ALL) == "ACK"
    assert counts(b.frontend) == (4, 3)
    assert mirrored(b.listener) == kvm_ram(vm) and b.listener.used == 1
    assert b.frontend.connected
    vhost.close()
    mem.close()


def test_usable_maps_what_the_usable_region_covers(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm)
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    dev = device(16 * GiB, "usable")
    mem.plug(dev)
    assert counts(b.frontend) == (1, 0)
    dev.set_requested_size(dev.memslot_size + BLOCK)        # the usable region spans 2+ memslots
    mapped = len(dev.mapped_memslots)
    assert mapped >= 2 and counts(b.frontend) == (1 + mapped, 0)
    assert mirrored(b.listener) == kvm_ram(vm)
    assert send(dev, RequestType.UNPLUG_ALL) == "ACK"       # shrinks the usable region
    assert counts(b.frontend) == (1 + mapped, mapped - len(dev.mapped_memslots))
    assert mirrored(b.listener) == kvm_ram(vm)
    vhost.close()
    mem.close()


def test_single_is_one_region_for_the_whole_device(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm)
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    dev = device(16 * GiB, "single", requested=GiB)
    mem.plug(dev)
    assert counts(b.frontend) == (2, 0)
    assert (dev.addr, 16 * GiB) in mirrored(b.listener)
    assert send(dev, RequestType.PLUG, 0, 4) == "ACK"
    assert counts(b.frontend) == (2, 0)
    mem.unplug("vmem0")
    assert counts(b.frontend) == (2, 1)
    assert mirrored(b.listener) == kvm_ram(vm)
    vhost.close()
    mem.close()


def test_without_configure_mem_slots_the_whole_table_is_sent(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm, maxmem=17 * GiB)             # device memory: 16 GiB
    mask = SUPPORTED_PROTOCOL_FEATURES & ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    frontend = VhostUserFrontend(backend.socket, "table", protocol_features_mask=mask)
    listener = VhostMemoryListener(frontend)
    assert not listener.incremental and listener.limit == 8
    mem.address_space.add_listener(listener)
    mem.budget.add_consumer("vhost:table", listener.free)
    dev = device(16 * GiB, "dynamic", requested=16 * GiB)
    mem.plug(dev)
    assert frontend.sent["SET_MEM_TABLE"] == 1
    assert dev.memslot_size == 4 * GiB              # 7 free slots of 8: 4 memslots
    assert send(dev, RequestType.PLUG, 0) == "ACK"
    assert send(dev, RequestType.PLUG, dev.memslot_size // BLOCK) == "ACK"
    assert frontend.sent["SET_MEM_TABLE"] == 3 and frontend.sent["ADD_MEM_REG"] == 0
    assert mirrored(listener) == kvm_ram(vm) and listener.used == 3
    assert frontend.connected                # the back-end accepted every table
    mem.close()
    frontend.close()


def test_a_1tib_device_next_to_a_32_slot_backend_gets_memslots_that_fit(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm, maxmem=1025 * GiB)                    # device memory: exactly 1 TiB
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    limit = b.listener.limit
    dev = device(1024 * GiB, "dynamic")
    mem.plug(dev)
    # free = min(KVM, back-end) = limit - 1 (boot RAM); the device gets all of it
    assert mem.budget.free() == limit - 1
    count = -(-dev.region_size // dev.memslot_size)
    assert count <= limit - 1
    assert dev.memslot_size == memslots_for_device(1024 * GiB, BLOCK, 1024 * GiB, limit - 1).memslot_size
    if limit == 32:                                         # Debian 12's qemu-storage-daemon
        assert (dev.memslot_size, count) == (64 * GiB, 16)
    # KVM alone would have given 1024 memslots of 1 GiB
    assert memslots_for_device(1024 * GiB, BLOCK, 1024 * GiB, vm.free_memslots).memslot_size == GiB
    # the first and the last memslot map (each 64 GiB memslot costs KVM about
    # 160 MiB of metadata on a shadow-MMU host, so not all 16 here)
    dev.set_requested_size(dev.region_size)
    assert send(dev, RequestType.PLUG, 0) == "ACK"
    assert send(dev, RequestType.PLUG, (count - 1) * (dev.memslot_size // BLOCK)) == "ACK"
    assert b.listener.used == 3 and counts(b.frontend) == (3, 0)
    assert mirrored(b.listener) == kvm_ram(vm)
    vhost.close()
    mem.close()


def test_a_backend_with_too_few_slots_added_after_the_decision_is_refused(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm, maxmem=1025 * GiB)
    dev = device(1024 * GiB, "dynamic", requested=GiB)
    mem.plug(dev)                                           # decided with KVM alone: 1024 slots
    assert mem.budget.outstanding == 1024
    slots, listeners = dict(vm.memslots), list(mem.address_space.listeners)
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    with pytest.raises(VhostUserError) as info:
        vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    limit = 32 if "7.2" in backend.version() else r"\d+"
    assert re.search(rf"vhost backend memory slots limit \({limit}\) is less than current number "
                     r"of used \(1\) and reserved \(1024\) memory slots for memory devices",
                     str(info.value)), str(info.value)
    assert vhost.devices == {} and mem.budget.consumers == ("kvm",)
    assert dict(vm.memslots) == slots and mem.address_space.listeners == listeners
    assert send(dev, RequestType.PLUG, 0) == "ACK"          # the VM's memory goes on as before
    mem.close()


def test_qmp_shows_each_consumers_limit_and_use(guest_elf, backend) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.vmm.machine import Machine, MachineConfig
    from kvmmem.vmm.qmp_commands import MachineMonitor

    props = VirtioMemProps(id="vmem0", memdev=HostMemory(1024 * GiB, "mem0", shared=True),
                           block_size=BLOCK)
    m = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest_elf), maxmem=512 * MiB + 1024 * GiB,
                              memory_devices=[props],
                              ram_backend=HostMemory(512 * MiB, "ram", shared=True),
                              vhost_devices=[VhostUserBlkProps("disk0", "c0", backend.socket)]))
    try:
        kvm, vhost = MachineMonitor(m, lambda event: None).execute("x-query-memslot-consumers", {})
        dev = m.devices["vmem0"]
        count = -(-dev.region_size // dev.memslot_size)
        assert kvm == {"consumer": "kvm", "limit": m.vm.max_memslots, "used": 1,
                       "free": m.vm.max_memslots - 1, "reserved": count}
        assert vhost["consumer"] == "vhost-user-blk:disk0" and vhost["connected"] is True
        assert (vhost["used"], vhost["free"], vhost["reserved"]) == \
            (1, vhost["limit"] - 1, count)
        assert count <= vhost["limit"] - 1          # the device fits the back-end
    finally:
        m.close()


def test_private_device_memory_is_refused_and_the_plug_rolled_back(vm, backend) -> None:  # type: ignore[no-untyped-def]
    mem = machine(vm)
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    with pytest.raises(VhostUserError, match="memory device 'vmem0' memdev 'private' is not shared"):
        vhost.check_memory_device(HostMemory(GiB, "private"), "vmem0")
    # past that check (a caller that skipped it): the listener refuses the memslot,
    # the commit rolls back, KVM and the back-end are as before and the guest gets BUSY
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(16 * GiB, "private"),
                                   block_size=BLOCK, requested_size=GiB))
    mem.plug(dev)
    slots = dict(vm.memslots)
    assert send(dev, RequestType.PLUG, 0) == "BUSY"
    assert dict(vm.memslots) == slots and counts(b.frontend) == (1, 0)
    assert dev.plugged_size == 0 and b.frontend.connected
    vhost.close()
    mem.close()


def test_rem_mem_reg_really_frees_the_backends_slot(vm, backend) -> None:  # type: ignore[no-untyped-def]
    # More map/unmap cycles of one memslot than the back-end has slots: if
    # REM_MEM_REG did not free the back-end's slot, ADD_MEM_REG would be
    # refused on the way and the plug answered BUSY.
    mem = machine(vm)
    vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    dev = device(16 * GiB, "dynamic", requested=16 * GiB)
    mem.plug(dev)
    for _ in range(b.listener.limit + 8):
        assert send(dev, RequestType.PLUG, 0) == "ACK"
        assert send(dev, RequestType.UNPLUG, 0) == "ACK"
    assert counts(b.frontend) == (1 + b.listener.limit + 8, b.listener.limit + 8)
    assert b.frontend.connected
    vhost.close()
    mem.close()


def test_a_disconnected_backend_no_longer_limits_the_memslot_decision(guest_elf, backend) -> None:  # type: ignore[no-untyped-def]
    """QEMU's vhost_user_blk_disconnect() ends in vhost_dev_cleanup(), which takes
    the device off the list vhost_get_free_memslots() looks at and unregisters
    its memory listener: a back-end that is gone no longer counts. A 1 TiB
    device plugged after the disconnect gets KVM's 1024 memslots of 1 GiB, not
    what the back-end's slots allowed, QMP lists KVM alone, and the device maps
    more memslots than the back-end had."""
    import time

    from kvmmem.vmm.machine import Machine, MachineConfig
    from kvmmem.vmm.qmp_commands import MachineMonitor

    m = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest_elf), maxmem=512 * MiB + 1024 * GiB,
                              ram_backend=HostMemory(512 * MiB, "ram", shared=True),
                              vhost_devices=[VhostUserBlkProps("disk0", "c0", backend.socket)]))
    try:
        b = m.vhost.devices["disk0"]
        limit = b.listener.limit
        monitor = MachineMonitor(m, lambda event: None)
        assert [c["consumer"] for c in monitor.execute("x-query-memslot-consumers", {})] == \
            ["kvm", "vhost-user-blk:disk0"]
        backend.kill()
        deadline = time.monotonic() + 20
        while b.frontend.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not b.frontend.connected
        assert m.memory.budget.consumers == ("kvm",)
        [kvm] = monitor.execute("x-query-memslot-consumers", {})
        assert kvm["consumer"] == "kvm" and kvm["reserved"] == 0
        dev = device(1024 * GiB, "dynamic", requested=1024 * GiB)
        with m.lock:
            m.memory.plug(dev)
        assert (dev.memslot_size, -(-dev.region_size // dev.memslot_size)) == (GiB, 1024)
        assert monitor.execute("x-query-memslot-consumers", {})[0]["reserved"] == 1024
        if limit <= 64:                 # 1 GiB memslots cost KVM about 2.5 MiB each
            per_slot = dev.memslot_size // BLOCK
            with m.lock:
                for slot in range(limit + 1):
                    assert send(dev, RequestType.PLUG, slot * per_slot) == "ACK"
            assert len(dev.mapped_memslots) == limit + 1
    finally:
        m.close()
