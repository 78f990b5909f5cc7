"""vhost-user-blk against a real qemu-storage-daemon, on a real KVM VM.

The host plays the guest driver (tests/vhost_helpers.py): it programs the
virtio-mmio registers, puts virtio-blk requests into a ring in guest RAM and
kicks the back-end through the transport's ioeventfd eventfd; the back-end
reads and writes the buffers in guest memory it mapped itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from serial_lines import SerialLines
from vhost_helpers import (
    SECTOR,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    GiB,
    HostBlkDriver,
    MiB,
    start_backend,
)

from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.vhost.backends import VhostBackends
from kvmmem.vhost.frontend import VhostUserError
from kvmmem.vhost.vhost_user_blk import SUPPORTED_FEATURES, VhostUserBlkProps
from kvmmem.virtio.mmio import Reg, Status
from kvmmem.vmm.machine_memory import MachineMemory

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]

BASE, GSI = 0xD0001000, 6


@pytest.fixture
def backend(tmp_path):  # type: ignore[no-untyped-def]
    b = start_backend(tmp_path)
    yield b
    b.kill()


@pytest.fixture
def irq_vm(vm):  # type: ignore[no-untyped-def]
    vm.create_irqchip()
    return vm


def machine(vm, shared: bool = True) -> MachineMemory:  # type: ignore[no-untyped-def]
    ram = HostMemory(1 * GiB, "pc.ram", shared=shared)
    return MachineMemory(vm, 1 * GiB, maxmem=64 * GiB, ram_host=ram)


def test_block_io_into_plugged_memory(irq_vm, backend, tmp_path):  # type: ignore[no-untyped-def]
    mem = machine(irq_vm)
    gm = GuestMemory(mem.address_space)
    vhost = VhostBackends(mem, irq_vm, gm)
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    # boot RAM is one RAM range: one ADD_MEM_REG so far
    assert b.frontend.sent["ADD_MEM_REG"] == 1
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(8 * GiB, "mem0", shared=True),
                                   block_size=128 * MiB, memslots="dynamic",
                                   requested_size=1 * GiB))
    mem.plug(dev)
    transport = vhost.realize("disk0", BASE, GSI)
    mem.system.add_subregion(BASE, transport.region)
    drv = HostBlkDriver(transport, gm, ring_gpa=0x100000)
    offered = drv.setup()
    assert offered & ~SUPPORTED_FEATURES & ~(1 << 32) == 0
    assert transport.read(Reg.DEVICE_ID, 4) == 2
    assert int.from_bytes(b.device.read_config(0, 8), "little") == 64 * MiB // SECTOR
    assert b.device.started
    # plug two blocks after the back-end connected; its memslot reaches the back-end
    from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
    raw = dev.handle(0, Request(RequestType.PLUG, dev.addr, 2).pack(), 10)
    assert raw is not None and Response.parse(raw).type.name == "ACK"
    assert b.frontend.sent["ADD_MEM_REG"] == 2
    src, dst = dev.addr, dev.addr + 128 * MiB + 4096
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(8192))
    gm.write(src, pattern)
    assert drv.submit(VIRTIO_BLK_T_OUT, 16, src, len(pattern)) == 0
    assert backend.read_image(16 * SECTOR, len(pattern)) == pattern
    assert drv.submit(VIRTIO_BLK_T_IN, 16, dst, len(pattern)) == 0
    assert gm.read(dst, len(pattern)) == pattern
    # the back-end holds the very eventfds KVM signals (QueueNotify) and is
    # signalled by (the irqfd): kicks and completions never pass through Python
    held = backend_eventfds(backend.proc.pid)
    kick, call = (eventfd_id(os.getpid(), fd) for fd in (transport.notify_fd, transport.irq_fd))
    assert kick is not None and call is not None and kick != call   # fdinfo eventfd-id: Linux 6.2+
    assert {kick, call} <= held
    # InterruptStatus shows a used buffer while the back-end runs the queue
    assert transport.read(Reg.INTERRUPT_STATUS, 4) & 1
    transport.reset()
    assert b.frontend.sent["GET_VRING_BASE"] == 1 and not b.device.started
    # after a reset the driver starts over with fresh rings, and I/O works again
    drv = HostBlkDriver(transport, gm, ring_gpa=0x180000)
    drv.setup()
    assert b.frontend.sent["SET_VRING_BASE"] == 2
    assert drv.submit(VIRTIO_BLK_T_IN, 16, src + 8192, len(pattern)) == 0
    assert gm.read(src + 8192, len(pattern)) == pattern
    vhost.close()
    mem.close()


def test_private_guest_ram_is_refused(irq_vm, backend):  # type: ignore[no-untyped-def]
    mem = machine(irq_vm, shared=False)
    vhost = VhostBackends(mem, irq_vm, GuestMemory(mem.address_space))
    slots = dict(irq_vm.memslots)
    with pytest.raises(VhostUserError, match="guest RAM 'pc.ram' is not shared memory"):
        vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    assert vhost.devices == {} and mem.budget.consumers == ("kvm",)
    assert dict(irq_vm.memslots) == slots
    mem.close()


def eventfd_id(pid: int, fd: int | None) -> int | None:
    """The kernel's id of an eventfd (``eventfd-id`` in fdinfo), None for other files."""
    try:
        info = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
    except OSError:
        return None
    ids = [line.split()[1] for line in info.splitlines() if line.startswith("eventfd-id:")]
    return int(ids[0]) if ids else None


def backend_eventfds(pid: int) -> set[int | None]:
    return {eventfd_id(pid, int(n)) for n in os.listdir(f"/proc/{pid}/fd")}


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.005)


def test_backend_death_sets_needs_reset_and_memory_goes_on(irq_vm, backend, caplog) -> None:  # type: ignore[no-untyped-def]
    mem = machine(irq_vm)
    gm = GuestMemory(mem.address_space)
    vhost = VhostBackends(mem, irq_vm, gm)
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(8 * GiB, "mem0", shared=True),
                                   block_size=128 * MiB, requested_size=8 * GiB))
    mem.plug(dev)
    transport = vhost.realize("disk0", BASE, GSI)
    mem.system.add_subregion(BASE, transport.region)
    drv = HostBlkDriver(transport, gm, ring_gpa=0x100000)
    drv.setup()
    assert drv.submit(VIRTIO_BLK_T_OUT, 0, 0x200000, 4096) == 0
    backend.kill()
    wait_for(lambda: transport.needs_reset, "the transport did not notice the dead back-end")
    assert transport.read(Reg.STATUS, 4) & Status.DEVICE_NEEDS_RESET
    assert transport.interrupt_status & 2                      # a config-change interrupt
    assert any("disconnected" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    assert not b.frontend.connected
    # memory keeps following the guest: memslots map and unmap in KVM as before
    from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
    before = len(irq_vm.memslots)
    raw = dev.handle(0, Request(RequestType.PLUG, dev.addr + 2 * GiB, 1).pack(), 10)
    assert raw is not None and Response.parse(raw).type.name == "ACK"
    assert len(irq_vm.memslots) == before + 1
    # the gone back-end is no memslot consumer any more (QEMU's vhost_dev_cleanup())
    assert b.listener.used == 0 and mem.budget.consumers == ("kvm",)
    raw = dev.handle(0, Request(RequestType.UNPLUG_ALL, 0, 0).pack(), 10)
    assert raw is not None and Response.parse(raw).type.name == "ACK"
    assert len(irq_vm.memslots) == before
    # the driver resets the device: no crash, GET_VRING_BASE is not sent to a dead back-end
    transport.reset()
    assert not transport.needs_reset and b.frontend.sent["GET_VRING_BASE"] == 0
    vhost.close()
    mem.close()


def test_backend_death_leaves_the_guest_running(guest_elf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import re

    from kvmmem.vmm.machine import Machine, MachineConfig

    backend = start_backend(tmp_path)
    steps = re.compile(r"plugged=(\d+) requested=(\d+) ok")
    plan = [2 * GiB, 512 * MiB]
    reached: list[int] = []

    def on_line(line: str) -> None:
        step = steps.search(line)
        if step is None or step[1] != step[2]:
            return
        reached.append(int(step[1]))
        if not plan:
            m.shutdown(7)                            # the last size is reached
            return
        if len(plan) == 2:                           # the first size is reached: the back-end dies
            backend.kill()
            wait_for(lambda: m.transports[1].needs_reset, "needs reset not set")
        m.devices["vmem0"].set_requested_size(plan.pop(0))

    serial = SerialLines(on_line)
    lines = serial.lines

    props = VirtioMemProps(id="vmem0", memdev=HostMemory(4 * GiB, "mem0", shared=True),
                           requested_size=GiB)
    m = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest_elf), maxmem=512 * MiB + 8 * GiB,
                              cmdline="kvmmem.steps=1000", memory_devices=[props], serial=serial,
                              ram_backend=HostMemory(512 * MiB, "ram", shared=True),
                              vhost_devices=[VhostUserBlkProps("disk0", "c0", backend.socket)]))
    try:
        status = m.run()
    finally:
        m.close()
        backend.kill()
    assert status == 7, lines                     # stopped by the test, not by a crash
    assert reached == [GiB, 2 * GiB, 512 * MiB]
    assert m.transports[1].needs_reset


def test_writeback_config_write_reaches_the_backend(irq_vm, backend) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.vhost.messages import Request as VhostRequest
    from kvmmem.vhost.messages import pack_config, unpack_config

    mem = machine(irq_vm)
    gm = GuestMemory(mem.address_space)
    vhost = VhostBackends(mem, irq_vm, gm)
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    transport = vhost.realize("disk0", BASE, GSI)
    mem.system.add_subregion(BASE, transport.region)
    drv = HostBlkDriver(transport, gm, ring_gpa=0x100000)
    wce = 1 << 11
    drv.setup(features=(1 << 32) | wce)
    assert transport.read(0x100 + 32, 1) == 0               # qemu-storage-daemon: writethrough
    transport.write(0x100 + 32, 1, 1)                       # the driver turns writeback on
    assert transport.read(0x100 + 32, 1) == 1
    answer = b.frontend.request(VhostRequest.GET_CONFIG, pack_config(0, bytes(60)))
    assert answer is not None and unpack_config(answer)[1][32] == 1
    transport.write(0x100 + 0, 4, 1234)                     # capacity is read-only
    assert int.from_bytes(b.device.read_config(0, 8), "little") == 64 * MiB // SECTOR
    assert transport.stats["bad_config_access"] == 1
    vhost.close()
    mem.close()


def test_machine_refuses_a_backend_added_after_the_memslot_decision(guest_elf, backend) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.vmm.machine import Machine, MachineConfig

    props = VirtioMemProps(id="vmem0", memdev=HostMemory(1024 * GiB, "mem0", shared=True),
                           block_size=128 * MiB)
    m = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest_elf),
                              maxmem=512 * MiB + 1024 * GiB, memory_devices=[props],
                              ram_backend=HostMemory(512 * MiB, "ram", shared=True)))
    try:
        assert m.devices["vmem0"].memslot_size == GiB       # KVM alone: 1024 memslots
        transports, slots = list(m.transports), dict(m.vm.memslots)
        with pytest.raises(VhostUserError, match=r"limit \(\d+\) is less than current number of "
                           r"used \(1\) and reserved \(1024\)"):
            m.add_vhost_user_blk(VhostUserBlkProps("disk0", "c0", backend.socket))
        assert m.transports == transports and dict(m.vm.memslots) == slots
        assert m.vhost.devices == {} and m.memory.budget.consumers == ("kvm",)
    finally:
        m.close()


def test_a_vcpu_queue_notify_reaches_the_backend_without_an_exit(irq_vm, backend) -> None:  # type: ignore[no-untyped-def]
    # A real vCPU writes QueueNotify: KVM's ioeventfd takes the write (the
    # vCPU goes straight on to its port write, no MMIO exit) and the back-end,
    # woken on that eventfd, serves the request.
    import struct

    from kvmmem.kvm import exits, x86

    mem = machine(irq_vm)
    gm = GuestMemory(mem.address_space)
    vhost = VhostBackends(mem, irq_vm, gm)
    vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    transport = vhost.realize("disk0", BASE, GSI)
    mem.system.add_subregion(BASE, transport.region)
    drv = HostBlkDriver(transport, gm, ring_gpa=0x100000)
    drv.setup()
    gdt, pml4, code = 0x500, 0x1000, 0x10000
    gm.write(gdt, x86.gdt_bytes())
    gm.write(pml4, x86.identity_page_tables(pml4, 4 * GiB))
    gm.write(code, bytes.fromhex("8906" "e610"))             # mov [rsi], eax; out 0x10, al
    vcpu = irq_vm.create_vcpu(0)
    sregs = vcpu.get_sregs()
    x86.setup_long_mode(sregs, pml4, gdt)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsi, regs.rax = code, 2, BASE + int(Reg.QUEUE_NOTIFY), 0
    vcpu.set_regs(regs)
    pattern = b"kick" * 1024
    gm.write(0x300000, pattern)
    # the request is put in the ring by hand; the vCPU's write is the only kick
    hdr, status = drv.headers, drv.headers + 16
    gm.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 40))
    gm.write(status, b"\xee")
    gm.write(drv.desc, struct.pack("<QIHHQIHHQIHH", hdr, 16, 1, 1, 0x300000, 4096, 1, 2,
                                   status, 1, 2, 0))
    gm.write(drv.avail + 4, struct.pack("<H", 0))
    gm.write(drv.avail + 2, struct.pack("<H", 1))
    served_in_python = transport.stats["notify_exits"]
    first = vcpu.run()
    assert isinstance(first, exits.IoExit) and first.port == 0x10, first   # no MmioExit first
    assert transport.stats["notify_exits"] == served_in_python
    wait_for(lambda: gm.read(drv.used + 2, 2) == b"\x01\x00", "the back-end served nothing")
    assert gm.read(status, 1) == b"\x00"
    assert backend.read_image(40 * SECTOR, 4096) == pattern
    vcpu.close()
    vhost.close()
    mem.close()


def test_a_ring_across_two_memslots_sets_needs_reset(irq_vm, backend) -> None:  # type: ignore[no-untyped-def]
    # The back-end maps each memslot on its own, so a ring must lie in one;
    # one that straddles two is refused at DRIVER_OK, and the VM goes on.
    from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response

    mem = machine(irq_vm)
    gm = GuestMemory(mem.address_space)
    vhost = VhostBackends(mem, irq_vm, gm)
    b = vhost.connect(VhostUserBlkProps("disk0", "c0", backend.socket))
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(8 * GiB, "mem0", shared=True),
                                   block_size=128 * MiB, requested_size=8 * GiB))
    mem.plug(dev)
    per_slot = dev.memslot_size // dev.block_size
    for block in (per_slot - 1, per_slot):
        raw = dev.handle(0, Request(RequestType.PLUG, dev.addr + block * dev.block_size, 1).pack(), 10)
        assert raw is not None and Response.parse(raw).type.name == "ACK"
    transport = vhost.realize("disk0", BASE, GSI)
    mem.system.add_subregion(BASE, transport.region)
    boundary = dev.addr + dev.memslot_size
    drv = HostBlkDriver(transport, gm, ring_gpa=boundary - 64)   # the descriptor table straddles
    drv.setup()
    assert transport.needs_reset and not b.device.started
    assert "not inside one RAM range" in (transport.last_violation or "")
    assert b.frontend.sent["SET_FEATURES"] == 0 and b.frontend.connected   # nothing sent
    vhost.close()
    mem.close()
