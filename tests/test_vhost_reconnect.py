"""A vhost-user-blk device connects again when its back-end comes back
(``-chardev socket,...,reconnect=SECONDS``, as QEMU's vhost-user-blk does).

Real KVM, a real qemu-storage-daemon killed and started again on the same
socket; the host-side driver plays the guest's part (it resets the device
after DEVICE_NEEDS_RESET, as Linux's virtio driver does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vhost_helpers import VIRTIO_BLK_T_OUT, GiB, HostBlkDriver, MiB, start_backend
from waiting import wait_until

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
from kvmmem.memory import HostMemory
from kvmmem.vhost.frontend import VhostUserError
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.virtio.mmio import Reg, Status
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]

RAM, RING, BLOCK = 256 * MiB, 0x8000000, 128 * MiB


def machine(guest_elf: Path, path: str, reconnect: int) -> Machine:
    props = VirtioMemProps(id="vmem0", memdev=HostMemory(4 * GiB, "mem0", shared=True),
                           block_size=BLOCK, requested_size=1 * GiB)
    return Machine(MachineConfig(
        ram_size=RAM, kernel=str(guest_elf), maxmem=RAM + 4 * GiB, memory_devices=[props],
        ram_backend=HostMemory(RAM, "pc.ram", shared=True),
        vhost_devices=[VhostUserBlkProps(id="disk0", chardev="c0", path=path,
                                         reconnect=reconnect)]))


def write(m: Machine, drv: HostBlkDriver, byte: int) -> int:
    m.guest_memory.write(RING + 0x10000, bytes([byte]) * 4096)
    return drv.submit(VIRTIO_BLK_T_OUT, 8, RING + 0x10000, 4096)


def plug(m: Machine, block: int) -> str:
    dev = m.devices["vmem0"]
    with m.lock:
        raw = dev.handle(0, Request(RequestType.PLUG, dev.addr + block * BLOCK, 1).pack(), 10)
    assert raw is not None
    return Response.parse(raw).type.name


def test_the_disk_reconnects_when_its_backend_comes_back(guest_elf: Path, tmp_path: Path) -> None:
    first = start_backend(tmp_path)
    m = machine(guest_elf, first.socket, reconnect=1)
    disk, transport = m.vhost.devices["disk0"], m.transports[1]
    try:
        drv = HostBlkDriver(transport, m.guest_memory, ring_gpa=RING)
        drv.setup()
        assert write(m, drv, 0x11) == 0
        first.kill()
        wait_until(lambda: not disk.frontend.connected, "the back-end's death was not seen")
        assert transport.read(int(Reg.STATUS), 4) & Status.DEVICE_NEEDS_RESET
        assert m.memory.budget.consumers == ("kvm",)
        assert plug(m, 0) == "ACK"                     # memory goes on meanwhile
        second = start_backend(tmp_path)               # the same socket path
        try:
            wait_until(lambda: m.vhost.devices["disk0"].frontend.connected,
                     "the device did not reconnect")
            assert m.reconnector is not None and m.reconnector.reconnects == 1
            disk = m.vhost.devices["disk0"]
            # the new back-end was shown all RAM, the block plugged meanwhile too
            ram = {(fr.start, fr.size) for fr in m.memory.address_space.flatview if fr.is_ram}
            assert {(r.desc.guest_phys_addr, r.desc.size) for r in disk.listener.regions()} == ram
            assert m.memory.budget.consumers == ("kvm", "vhost-user-blk:disk0")
            assert plug(m, 8) == "ACK"                  # a block in the next memslot
            assert disk.frontend.sent["ADD_MEM_REG"] == len(ram) + 1
            # the driver resets the device after DEVICE_NEEDS_RESET, and writes again
            drv = HostBlkDriver(transport, m.guest_memory, ring_gpa=RING)
            drv.setup()
            assert not transport.read(int(Reg.STATUS), 4) & Status.DEVICE_NEEDS_RESET
            assert write(m, drv, 0x22) == 0
            assert second.read_image(8 * 512, 4096) == b"\x22" * 4096
        finally:
            second.kill()
    finally:
        m.close()


def test_a_backend_that_comes_back_with_another_disk_is_refused(guest_elf: Path,
                                                                tmp_path: Path) -> None:
    first = start_backend(tmp_path)
    m = machine(guest_elf, first.socket, reconnect=0)        # no thread: tried by hand
    try:
        disk = m.vhost.devices["disk0"]
        first.kill()
        wait_until(lambda: not disk.frontend.connected, "the back-end's death was not seen")
        with m.lock:
            assert m.vhost.reconnect("disk0") is False     # nobody listens yet
        second = start_backend(tmp_path, size=32 * MiB)
        try:
            listeners = list(m.memory.address_space.listeners)
            with m.lock, pytest.raises(VhostUserError, match="another disk size"):
                m.vhost.reconnect("disk0")
            # nothing changed: the same listeners, budget and (gone) connection
            assert m.memory.address_space.listeners == listeners
            assert m.memory.budget.consumers == ("kvm",)
            assert m.vhost.devices["disk0"] is disk and not disk.frontend.connected
        finally:
            second.kill()
    finally:
        m.close()
