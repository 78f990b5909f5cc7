"""A faulty vhost-user back-end never crashes the VMM, breaks the memory
model or marks the wrong device (issue 20, items 1-6).

Each test puts one misbehaviour between kvmmem and a real
qemu-storage-daemon (tests/vhost_proxy.py: every other message is relayed
as it is) and checks what QEMU does in that case: a refused stop is logged
and the reset goes on; a reply of the wrong size or one that does not come
in time is a protocol error, after which the back-end is gone, the disk
shows DEVICE_NEEDS_RESET and the VM runs on; a back-end that refuses to
unmap memory, or to take back a change, is dropped.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vhost_helpers import VIRTIO_BLK_T_OUT, Backend, GiB, HostBlkDriver, MiB, start_backend
from vhost_proxy import Fault, FaultProxy

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMemPropertyError, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
from kvmmem.memory import HostMemory
from kvmmem.vhost.frontend import VhostUserError
from kvmmem.vhost.messages import ProtocolFeature
from kvmmem.vhost.messages import Request as VR
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.virtio.mmio import Reg, Status
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]

RAM = 256 * MiB
RING = 0x8000000
BLOCK = 128 * MiB


class Rig:
    def __init__(self, guest_elf: Path, path: str, mode: str = "dynamic") -> None:
        props = VirtioMemProps(id="vmem0", memdev=HostMemory(4 * GiB, "mem0", shared=True),
                               block_size=BLOCK, memslots=MemslotMode(mode),
                               requested_size=1 * GiB)
        self.machine = Machine(MachineConfig(
            ram_size=RAM, kernel=str(guest_elf), maxmem=RAM + 4 * GiB, memory_devices=[props],
            ram_backend=HostMemory(RAM, "pc.ram", shared=True),
            vhost_devices=[VhostUserBlkProps(id="disk0", chardev="c0", path=path)]))
        self.dev = self.machine.devices["vmem0"]
        self.transport = self.machine.transports[1]
        self.disk = self.machine.vhost.devices["disk0"]

    def start_driver(self) -> HostBlkDriver:
        drv = HostBlkDriver(self.transport, self.machine.guest_memory, ring_gpa=RING)
        drv.setup()
        return drv

    def send(self, type: RequestType, block: int = 0, n: int = 1) -> str:
        raw = self.dev.handle(0, Request(type, self.dev.addr + block * BLOCK, n).pack(), 10)
        assert raw is not None
        return Response.parse(raw).type.name

    def gone(self) -> bool:
        return not self.disk.frontend.connected

    def disk_needs_reset(self) -> bool:
        return bool(self.transport.read(int(Reg.STATUS), 4) & Status.DEVICE_NEEDS_RESET)

    def check_vm_goes_on(self) -> None:
        """Memory still follows the guest, the virtio-mem device is sound, the VM closes."""
        assert not self.dev.needs_reset
        assert self.send(RequestType.PLUG, 2) == "ACK"
        assert self.send(RequestType.UNPLUG, 2) == "ACK"


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[Backend]:
    b = start_backend(tmp_path)
    yield b
    b.kill()


@pytest.fixture
def rig_with(guest_elf: Path, qsd: Backend, tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[tuple[FaultProxy, Rig | None]] = []

    def make(fault: Fault, mode: str = "dynamic") -> Rig:
        proxy = FaultProxy(tmp_path, qsd.socket, fault)
        made.append((proxy, None))
        rig = Rig(guest_elf, proxy.path, mode)
        made[-1] = (proxy, rig)
        return rig

    yield make
    for proxy, rig in made:
        if rig is not None:
            rig.machine.close()
        proxy.close()


def stop_ring(req: VR, payload: bytes) -> bool:
    return req is VR.SET_VRING_ENABLE and struct.unpack("<II", payload)[1] == 0


def test_a_refused_ring_stop_is_logged_and_the_reset_completes(rig_with, caplog) -> None:  # type: ignore[no-untyped-def]
    fault = Fault(refuse=stop_ring)
    rig = rig_with(fault)
    drv = rig.start_driver()
    assert rig.send(RequestType.PLUG, 0, 2) == "ACK"
    rig.machine.reset()                                    # raised VhostUserError before
    assert fault.seen == ["SET_VRING_ENABLE"]
    assert rig.dev.plugged_size == 0 and not rig.disk.device.started
    assert any("stopping the back-end failed" in r.getMessage() and "refused SET_VRING_ENABLE"
               in r.getMessage() for r in caplog.records)
    # the daemon itself still works: the driver starts over and writes
    drv = rig.start_driver()
    rig.machine.guest_memory.write(RING + 0x10000, b"\x11" * 4096)
    assert drv.submit(VIRTIO_BLK_T_OUT, 8, RING + 0x10000, 4096) == 0
    rig.check_vm_goes_on()


@pytest.mark.parametrize("request_name", ["SET_VRING_NUM", "SET_VRING_ADDR"])
def test_a_short_reply_ack_at_driver_ok_is_a_protocol_error(rig_with, request_name) -> None:  # type: ignore[no-untyped-def]
    which = VR[request_name]
    fault = Fault(reply=lambda req, payload: payload[:4] if req is which else None)
    rig = rig_with(fault)
    rig.start_driver()                    # DRIVER_OK: the vCPU thread died here before
    assert fault.seen == [request_name]
    assert rig.gone() and rig.disk_needs_reset()
    rig.check_vm_goes_on()


def test_a_short_reply_ack_of_add_mem_reg_drops_the_disk_not_virtio_mem(rig_with) -> None:  # type: ignore[no-untyped-def]
    armed = [False]
    fault = Fault(reply=lambda req, payload: payload[:4] if armed[0] and req is VR.ADD_MEM_REG
                  else None)
    rig = rig_with(fault)
    rig.start_driver()
    armed[0] = True
    assert rig.send(RequestType.PLUG, 0) == "ACK"      # the memory is mapped for KVM anyway
    assert fault.seen == ["ADD_MEM_REG"]
    assert rig.gone() and rig.disk_needs_reset()
    assert not rig.dev.needs_reset                       # virtio-mem was marked before
    rig.check_vm_goes_on()


def test_a_wrong_size_vring_base_at_reset_is_a_protocol_error(rig_with) -> None:  # type: ignore[no-untyped-def]
    fault = Fault(reply=lambda req, payload: payload[:4] if req is VR.GET_VRING_BASE else None)
    rig = rig_with(fault)
    rig.start_driver()
    rig.machine.reset()                                  # ended the VMM before
    assert fault.seen == ["GET_VRING_BASE"]
    assert rig.gone()
    assert rig.dev.plugged_size == 0
    rig.check_vm_goes_on()


def test_a_get_config_whose_size_field_lies_is_refused_at_start(guest_elf, qsd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    def lie(req: VR, payload: bytes) -> bytes | None:
        if req is not VR.GET_CONFIG:
            return None
        offset, size, flags = struct.unpack_from("<III", payload)
        return struct.pack("<III", offset, size + 4, flags) + payload[12:]
    proxy = FaultProxy(tmp_path, qsd.socket, Fault(reply=lie))
    try:
        with pytest.raises(VhostUserError, match="bad reply to GET_CONFIG"):
            Rig(guest_elf, proxy.path)
    finally:
        proxy.close()


def test_a_dripping_reply_gets_one_deadline_for_the_whole_reply(rig_with) -> None:  # type: ignore[no-untyped-def]
    fault = Fault(drip=frozenset({VR.GET_VRING_BASE}), drip_delay=0.5)
    rig = rig_with(fault)
    rig.disk.frontend._timeout = 2.0       # 20 bytes at 0.5 s: 10 s if each recv had 2 s
    rig.start_driver()
    rig.machine.reset()
    # each byte came within the 2 s a recv() was given, so the reply used to be
    # waited for whole (20 bytes x 0.5 s) and taken; the deadline cuts it after 2 s
    assert rig.gone() and "GET_VRING_BASE failed" in (rig.disk.frontend.disconnect_reason or "")


def test_a_refused_rem_mem_reg_drops_the_backend_and_the_reset_and_close_complete(rig_with, caplog) -> None:  # type: ignore[no-untyped-def]
    fault = Fault(refuse=lambda req, payload: req is VR.REM_MEM_REG)
    rig = rig_with(fault)
    rig.start_driver()
    assert rig.send(RequestType.PLUG, 0, 2) == "ACK"
    rig.machine.reset()                                  # killed the VMM before
    assert fault.seen == ["REM_MEM_REG"]
    assert rig.gone() and rig.disk_needs_reset()
    assert rig.dev.plugged_size == 0
    assert any("REM_MEM_REG refused, the back-end is dropped" in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    rig.check_vm_goes_on()
    rig.machine.close()                                  # every exit ended in a traceback before


def without_mem_slots(req: VR, payload: bytes) -> bytes | None:
    if req is not VR.GET_PROTOCOL_FEATURES:
        return None
    features = struct.unpack("<Q", payload)[0] & ~(1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
    return struct.pack("<Q", features)


def test_set_mem_table_refused_for_the_change_and_its_undo_drops_the_backend(rig_with) -> None:  # type: ignore[no-untyped-def]
    armed = [False]
    fault = Fault(reply=without_mem_slots,
                  refuse=lambda req, payload: armed[0] and req is VR.SET_MEM_TABLE)
    rig = rig_with(fault)
    assert not rig.disk.listener.incremental
    slots = dict(rig.machine.vm.memslots)
    armed[0] = True
    # the plug's SET_MEM_TABLE is refused: rolled back (BUSY, KVM as before);
    # the undo's SET_MEM_TABLE is refused too: the back-end goes, not the model
    assert rig.send(RequestType.PLUG, 0) == "BUSY"       # MemoryRollbackError before
    assert fault.seen == ["GET_PROTOCOL_FEATURES", "SET_MEM_TABLE", "SET_MEM_TABLE"]
    assert dict(rig.machine.vm.memslots) == slots
    assert rig.gone() and rig.disk_needs_reset()
    assert rig.machine.memory.budget.consumers == ("kvm",)
    rig.check_vm_goes_on()


def test_usable_requested_size_refused_by_the_backend_changes_nothing(rig_with) -> None:  # type: ignore[no-untyped-def]
    armed = [False]
    fault = Fault(refuse=lambda req, payload: armed[0] and req is VR.ADD_MEM_REG)
    rig = rig_with(fault, mode="usable")
    armed[0] = True
    before = (rig.dev.requested_size, rig.dev.usable_region_size, dict(rig.machine.vm.memslots))
    with pytest.raises(VirtioMemPropertyError, match="refused ADD_MEM_REG"):
        rig.dev.set_requested_size(3 * GiB)
    assert (rig.dev.requested_size, rig.dev.usable_region_size,
            dict(rig.machine.vm.memslots)) == before
    assert not rig.gone()


def test_usable_requested_size_with_a_malformed_ack_keeps_one_consistent_state(rig_with) -> None:  # type: ignore[no-untyped-def]
    armed = [False]
    fault = Fault(reply=lambda req, payload: payload[:4] if armed[0] and req is VR.ADD_MEM_REG
                  else None)
    rig = rig_with(fault, mode="usable")
    armed[0] = True
    rig.dev.set_requested_size(3 * GiB)                  # the back-end goes; memory follows
    assert fault.seen == ["ADD_MEM_REG"]
    assert rig.gone() and not rig.dev.needs_reset
    assert rig.dev.requested_size == 3 * GiB and rig.dev.usable_region_size >= 3 * GiB
    rig.check_vm_goes_on()


@pytest.mark.slow
def test_sigterm_ends_kvmmem_run_while_a_backend_drips_its_reply(guest_elf, qsd, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A reply coming one byte every 2 s (20 bytes: 40 s, each byte well within
    the per-recv timeout it used to get) held the vCPU thread, under the machine
    lock, for all of it: SIGTERM did not end the VMM. With one deadline per
    reply (10 s) the request fails, the disk is gone, and SIGTERM ends the run."""
    import os
    import signal
    import subprocess
    import sys

    fault = Fault(drip=frozenset({VR.SET_FEATURES}), drip_delay=2.0)
    proxy = FaultProxy(tmp_path, qsd.socket, fault)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmmem", "run", "-kernel", str(guest_elf), "-m", "256M,maxmem=4G",
         "-object", "memory-backend-memfd,id=ram,size=256M", "-machine", "memory-backend=ram",
         "-object", "memory-backend-memfd,id=mem0,size=2G",
         "-device", "virtio-mem,id=vmem0,memdev=mem0",
         "-chardev", f"socket,id=c0,path={proxy.path}",
         "-device", "vhost-user-blk,chardev=c0,id=disk0", "-append", "kvmmem.blk=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        deadline = time.monotonic() + 30
        while "SET_FEATURES" not in fault.seen:          # DRIVER_OK: the drip has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)            # 40 s of dripping before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()
    assert proc.returncode == 0, err
    assert "SET_FEATURES failed" in err and "Traceback" not in err, err


def test_rings_the_backend_will_not_restart_after_a_memory_change_drop_it(rig_with) -> None:  # type: ignore[no-untyped-def]
    armed = [False]
    fault = Fault(refuse=lambda req, payload: armed[0] and req is VR.SET_VRING_ADDR)
    rig = rig_with(fault, mode="exact")
    rig.start_driver()
    # 4 GiB next to a 32-slot back-end: exact may map 4 memslots. Blocks 0, 3, 5
    # and 7 take them; block 9 makes grid memslot 0 coarse, replacing the four
    # memslots under plugged memory (the back-end is stopped and restarted).
    for block in (0, 3, 5, 7):
        assert rig.send(RequestType.PLUG, block) == "ACK"
    assert rig.dev.nb_memslots == 4
    armed[0] = True
    assert rig.send(RequestType.PLUG, 9) == "ACK"
    assert rig.dev.nb_memslots < 5 and rig.disk.device.pauses
    assert "SET_VRING_ADDR" in fault.seen       # the restart after it was refused
    # the disk shows it needs a reset (it was only logged before); memory went on
    assert rig.gone() and rig.disk_needs_reset()
    rig.check_vm_goes_on()
