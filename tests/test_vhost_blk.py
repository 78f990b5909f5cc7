"""vhost-user-blk against a real qemu-storage-daemon, on a real KVM VM.

The host plays the guest driver (tests/vhost_helpers.py): it programs the
virtio-mmio registers, puts virtio-blk requests into a ring in guest RAM and
kicks the back-end through the transport's ioeventfd eventfd; the back-end
reads and writes the buffers in guest memory it mapped itself.
"""

from __future__ import annotations

import pytest

from kvmmem.devices.vhost_user_blk import SUPPORTED_FEATURES, VhostUserBlkProps
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.vhost.backends import VhostBackends
from kvmmem.vhost.frontend import VhostUserError
from kvmmem.virtio.guest_memory import GuestMemory
from kvmmem.virtio.mmio import Reg, Status
from kvmmem.vmm.machine_memory import MachineMemory
from vhost_helpers import (GiB, MiB, SECTOR, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
                                 HostBlkDriver, start_backend)

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
    # InterruptStatus shows a used buffer while the back-end runs the queue
    assert transport.read(Reg.INTERRUPT_STATUS, 4) & 1
    transport.reset()
    assert b.frontend.sent["GET_VRING_BASE"] == 1
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
