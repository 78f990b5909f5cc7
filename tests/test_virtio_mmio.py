"""The virtio-mmio transport: registers, handshake, queues, guest errors.

A fake device (plain Python, not KVM) answers requests; guest RAM is a real
HostMemory-backed region, and the driver's register accesses go through the
address space to the transport's I/O region, as the run loop dispatches MMIO
exits.  One test wires the irqfd and ioeventfd into a real VM.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmmem.devices.notifier import Notifier
from kvmmem.memory import AddressSpace, HostMemory, MemoryRegion, memory_transaction
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.virtio.device import VIRTIO_F_VERSION_1, VirtioDevice
from kvmmem.virtio.mmio import (
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    MAGIC_VALUE,
    VENDOR_ID,
    Reg,
    Status,
    VirtioMmioTransport,
)
from kvmmem.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

MIB = 1 << 20
RAM_SIZE = 2 * MIB
BASE = 0xD000_0000
OTHER_MMIO = 0xE000_0000
HOLE = 0x1000_0000
QUEUE_MAX = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
REQ, RESP = 0x10000, 0x20000
F_NEXT, F_WRITE = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
DEVICE_FEATURE = 1 << 3
FEATURES = (1 << VIRTIO_F_VERSION_1) | DEVICE_FEATURE
NEEDS_RESET = int(Status.DEVICE_NEEDS_RESET)
HANDSHAKE = int(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
RUNNING = HANDSHAKE | int(Status.DRIVER_OK)


class EchoDevice:
    """Answers each request with the request reversed; b"BAD" is a violation."""

    device_id = 42
    queue_max_sizes = (QUEUE_MAX,)

    def __init__(self) -> None:
        self.needs_reset = False
        self.config_change_notifiers: Notifier[None] = Notifier()
        self.accept = True
        self.accepted: int | None = None
        self.config = bytearray(struct.pack("<QI", 0x1122334455667788, 0xAABBCCDD))
        self.requests: list[tuple[int, bytes, int]] = []
        self.resets = 0

    def device_features(self) -> int:
        return DEVICE_FEATURE

    def set_driver_features(self, features: int) -> bool:
        self.accepted = features
        return self.accept

    def read_config(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > len(self.config):
            raise ValueError("outside config space")
        return bytes(self.config[offset:offset + size])

    def write_config(self, offset: int, data: bytes) -> None:
        if offset < 0 or offset + len(data) > len(self.config):
            raise ValueError("outside config space")
        self.config[offset:offset + len(data)] = data

    def handle(self, queue: int, request: bytes, response_capacity: int) -> bytes | None:
        self.requests.append((queue, request, response_capacity))
        if request == b"BAD":
            self.needs_reset = True
            return None
        if request == b"CRASH":
            raise RuntimeError("device bug")
        return request[::-1][:response_capacity]

    def reset(self) -> None:
        self.needs_reset = False
        self.resets += 1

    def change_config(self) -> None:
        self.config[0] ^= 0xFF
        self.config_change_notifiers.notify(None)


class Guest:
    """RAM, the transport mapped at BASE, and a minimal virtio driver."""

    def __init__(self, vm: object = None, gsi: int | None = None, ram_base: int = 0,
                 ram_size: int = RAM_SIZE, base: int = BASE) -> None:
        self.host = HostMemory(ram_size, "ram")
        self.root = MemoryRegion.container("system", 1 << 32)
        self.space = AddressSpace(self.root, "memory")
        self.memory = GuestMemory(self.space)
        self.device = EchoDevice()
        self.interrupts: list[int] = []
        self.base = base
        self.transport = VirtioMmioTransport(self.device, self.memory, vm, gsi,  # type: ignore[arg-type]
                                             base=base, name="virtio-mmio-test",
                                             interrupt=self.interrupts.append)
        with memory_transaction():
            self.root.add_subregion(ram_base, MemoryRegion.ram("ram", self.host))
            self.root.add_subregion(base, self.transport.region)
            self.root.add_subregion(OTHER_MMIO, MemoryRegion.io("other", 0x1000))
        self.avail_idx = 0

    def close(self) -> None:
        self.transport.close()
        self.space.destroy()
        self.host.close()

    # -- registers, through the address space like an MMIO exit ------------------

    def rd(self, reg: int, size: int = 4) -> int:
        return self.space.read(self.base + reg, size)

    def wr(self, reg: int, value: int, size: int = 4) -> None:
        self.space.write(self.base + reg, size, value)

    @property
    def status(self) -> int:
        return self.rd(Reg.STATUS)

    def negotiate(self, features: int = FEATURES) -> int:
        self.wr(Reg.STATUS, 0)
        self.wr(Reg.STATUS, Status.ACKNOWLEDGE)
        self.wr(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
        for sel in (0, 1):
            self.wr(Reg.DRIVER_FEATURES_SEL, sel)
            self.wr(Reg.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.wr(Reg.STATUS, HANDSHAKE)
        return self.status

    def setup_queue(self, num: int = QUEUE_MAX, desc: int = DESC, avail: int = AVAIL,
                    used: int = USED) -> None:
        self.wr(Reg.QUEUE_SEL, 0)
        self.wr(Reg.QUEUE_NUM, num)
        for low, addr in ((Reg.QUEUE_DESC_LOW, desc), (Reg.QUEUE_DRIVER_LOW, avail),
                          (Reg.QUEUE_DEVICE_LOW, used)):
            self.wr(low, addr & 0xFFFFFFFF)
            self.wr(low + 4, addr >> 32)
        self.wr(Reg.QUEUE_READY, 1)
        self.num = num

    def start(self) -> None:
        """The whole bring-up of a working device."""
        assert self.negotiate() == HANDSHAKE
        self.memory.write(AVAIL, bytes(4))
        self.memory.write(USED, bytes(4))
        self.avail_idx = 0
        self.setup_queue()
        self.wr(Reg.STATUS, RUNNING)
        assert self.status == RUNNING

    # -- the ring ------------------------------------------------------------------

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.memory.write(DESC + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int, notify: bool = True) -> None:
        self.memory.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        if notify:
            self.wr(Reg.QUEUE_NOTIFY, 0)

    def request(self, data: bytes, head: int = 0, capacity: int = 64, notify: bool = True) -> None:
        """A two-descriptor chain: ``data`` to read, ``capacity`` bytes to write."""
        second = (head + 1) % self.num
        self.memory.write(REQ + 0x100 * head, data)
        self.set_desc(head, REQ + 0x100 * head, len(data), F_NEXT, second)
        self.set_desc(second, RESP + 0x100 * head, capacity, F_WRITE)
        self.offer(head, notify)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(USED + 2, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(USED + 4 + 8 * (slot % self.num), 8))

    def response(self, head: int, length: int) -> bytes:
        return self.memory.read(RESP + 0x100 * head, length)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


# -- identification and plain registers ------------------------------------------------


def test_identification_registers(guest: Guest) -> None:
    assert guest.rd(Reg.MAGIC_VALUE) == MAGIC_VALUE == int.from_bytes(b"virt", "little")
    assert guest.rd(Reg.VERSION) == 2
    assert guest.rd(Reg.DEVICE_ID) == EchoDevice.device_id
    assert guest.rd(Reg.VENDOR_ID) == VENDOR_ID
    assert guest.transport.region.size == 0x200
    assert isinstance(guest.device, VirtioDevice)


def test_shared_memory_regions_do_not_exist(guest: Guest) -> None:
    guest.wr(Reg.SHM_SEL, 0)
    assert guest.rd(Reg.SHM_LEN_LOW) == guest.rd(Reg.SHM_LEN_HIGH) == 0xFFFFFFFF
    assert guest.rd(Reg.QUEUE_RESET) == 0


def test_queue_num_max_per_selected_queue(guest: Guest) -> None:
    assert guest.rd(Reg.QUEUE_NUM_MAX) == QUEUE_MAX
    guest.wr(Reg.QUEUE_SEL, 1)                     # the device has one queue
    assert guest.rd(Reg.QUEUE_NUM_MAX) == 0
    assert guest.rd(Reg.QUEUE_READY) == 0
    guest.wr(Reg.QUEUE_READY, 1)
    assert guest.transport.stats["no_such_queue"] == 1 and not guest.transport.needs_reset


def test_device_features_include_version_1(guest: Guest) -> None:
    guest.wr(Reg.DEVICE_FEATURES_SEL, 0)
    low = guest.rd(Reg.DEVICE_FEATURES)
    guest.wr(Reg.DEVICE_FEATURES_SEL, 1)
    high = guest.rd(Reg.DEVICE_FEATURES)
    guest.wr(Reg.DEVICE_FEATURES_SEL, 2)
    assert guest.rd(Reg.DEVICE_FEATURES) == 0
    assert low | high << 32 == FEATURES


@pytest.mark.parametrize("access", [
    ("read", Reg.STATUS, 2), ("read", Reg.STATUS + 1, 1), ("read", Reg.MAGIC_VALUE, 8),
    ("write", Reg.STATUS, 1), ("write", Reg.STATUS + 2, 2), ("write", Reg.QUEUE_NUM, 8),
])
def test_wrong_size_or_unaligned_register_access_is_ignored(guest: Guest,
                                                            access: tuple[str, int, int]) -> None:
    guest.negotiate()
    kind, offset, size = access
    if kind == "read":
        assert guest.rd(offset, size) == 0
    else:
        guest.wr(offset, 0 if offset == Reg.STATUS else 4, size)
    assert guest.transport.stats["bad_register_access"] == 1
    assert guest.status == HANDSHAKE and not guest.transport.needs_reset
    assert guest.transport.queues[0].num == QUEUE_MAX


def test_read_only_write_only_and_unknown_registers(guest: Guest) -> None:
    guest.wr(Reg.MAGIC_VALUE, 0)
    guest.wr(Reg.INTERRUPT_STATUS, 3)
    assert guest.rd(Reg.MAGIC_VALUE) == MAGIC_VALUE
    assert guest.transport.stats["write_to_read_only"] == 2
    assert guest.rd(Reg.QUEUE_NOTIFY) == 0
    assert guest.transport.stats["read_of_write_only"] == 1
    guest.wr(0x0E8, 1)
    assert guest.rd(0x0E8) == 0
    assert guest.transport.stats["unknown_register"] == 2


# -- handshake and features -------------------------------------------------------------


def test_handshake_and_feature_negotiation(guest: Guest) -> None:
    assert guest.status == 0
    guest.wr(Reg.STATUS, Status.ACKNOWLEDGE)
    assert guest.status == Status.ACKNOWLEDGE
    assert guest.negotiate() == HANDSHAKE
    assert guest.device.accepted == FEATURES
    assert guest.transport.driver_features == FEATURES
    # features are frozen once FEATURES_OK is set
    guest.wr(Reg.DRIVER_FEATURES_SEL, 0)
    guest.wr(Reg.DRIVER_FEATURES, 0)
    assert guest.transport.driver_features == FEATURES
    assert guest.transport.stats["features_after_features_ok"] == 1
    guest.wr(Reg.STATUS, RUNNING)
    assert guest.status == RUNNING


@pytest.mark.parametrize("features, device_accepts", [
    (FEATURES, False),                              # the device says no
    (FEATURES | 1 << 7, True),                      # a feature that was never offered
    (DEVICE_FEATURE, True),                         # VIRTIO_F_VERSION_1 not accepted
])
def test_features_ok_is_refused(guest: Guest, features: int, device_accepts: bool) -> None:
    guest.device.accept = device_accepts
    status = guest.negotiate(features)
    assert not status & Status.FEATURES_OK
    assert status == Status.ACKNOWLEDGE | Status.DRIVER
    assert guest.transport.stats["features_refused"] == 1
    assert not guest.transport.needs_reset          # refusal is not an error
    guest.wr(Reg.STATUS, guest.status | Status.FAILED)
    assert guest.status & Status.FAILED


def test_feature_bits_beyond_64_are_refused(guest: Guest) -> None:
    guest.wr(Reg.DRIVER_FEATURES_SEL, 5)
    guest.wr(Reg.DRIVER_FEATURES, 1)
    for sel in (0, 1):
        guest.wr(Reg.DRIVER_FEATURES_SEL, sel)
        guest.wr(Reg.DRIVER_FEATURES, (FEATURES >> (32 * sel)) & 0xFFFFFFFF)
    guest.wr(Reg.STATUS, HANDSHAKE)
    assert not guest.status & Status.FEATURES_OK


def test_driver_ok_without_features_ok_needs_reset(guest: Guest) -> None:
    guest.wr(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)
    assert guest.status & NEEDS_RESET and not guest.status & Status.DRIVER_OK


# -- queue setup --------------------------------------------------------------------------


def test_queue_setup(guest: Guest) -> None:
    guest.negotiate()
    guest.setup_queue(num=4)
    state = guest.transport.queues[0]
    assert guest.rd(Reg.QUEUE_READY) == 1 and state.ready
    assert state.ring is not None and state.ring.size == 4
    assert (state.desc, state.driver, state.device) == (DESC, AVAIL, USED)
    # setup registers of a ready queue are frozen
    guest.wr(Reg.QUEUE_NUM, 2)
    guest.wr(Reg.QUEUE_DESC_LOW, 0x5000)
    assert state.num == 4 and state.desc == DESC
    assert guest.transport.stats["setup_of_ready_queue"] == 2
    guest.wr(Reg.QUEUE_READY, 0)
    assert guest.rd(Reg.QUEUE_READY) == 0 and state.ring is None
    assert not guest.transport.needs_reset


@pytest.mark.parametrize("setup", [
    {"num": 6}, {"num": 0}, {"num": QUEUE_MAX * 2},             # QueueNum
    {"desc": HOLE}, {"avail": OTHER_MMIO}, {"used": BASE},      # areas outside RAM
    {"used": RAM_SIZE - 16},                                     # runs off the end of RAM
    {"desc": 1 << 40},                                           # high address half
    {"desc": DESC + 4}, {"used": USED + 2},                      # misaligned
])
def test_bad_queue_setup_needs_reset(guest: Guest, setup: dict[str, int]) -> None:
    guest.negotiate()
    guest.setup_queue(**setup)
    assert guest.status & NEEDS_RESET
    assert guest.rd(Reg.QUEUE_READY) == 0
    assert guest.transport.last_violation
    # not running yet: the config-change interrupt waits for DRIVER_OK
    assert guest.interrupts == []
    guest.wr(Reg.STATUS, RUNNING)
    assert guest.interrupts == [INT_CONFIG_CHANGE]
    assert guest.rd(Reg.INTERRUPT_STATUS) == INT_CONFIG_CHANGE
    # and a reset recovers
    guest.start()
    guest.request(b"ok")
    assert guest.used_idx() == 1


# -- requests -------------------------------------------------------------------------------


def test_request_response_roundtrip(guest: Guest) -> None:
    guest.start()
    guest.request(b"hello", head=2, capacity=16)
    assert guest.device.requests == [(0, b"hello", 16)]
    assert guest.used_idx() == 1
    assert guest.used_elem(0) == (2, 5)
    assert guest.response(2, 5) == b"olleh"
    assert guest.interrupts == [INT_USED_BUFFER]
    assert guest.rd(Reg.INTERRUPT_STATUS) == INT_USED_BUFFER
    guest.wr(Reg.INTERRUPT_ACK, INT_USED_BUFFER)
    assert guest.rd(Reg.INTERRUPT_STATUS) == 0


def test_response_is_truncated_to_the_writable_capacity(guest: Guest) -> None:
    guest.start()
    guest.request(b"abcdef", capacity=3)
    assert guest.used_elem(0) == (0, 3)
    assert guest.response(0, 3) == b"fed"


def test_one_notification_serves_all_chains_with_one_interrupt(guest: Guest) -> None:
    guest.start()
    for i in range(3):
        guest.request(bytes([65 + i]) * 3, head=2 * i, notify=False)
    guest.wr(Reg.QUEUE_NOTIFY, 0)
    assert [r[1] for r in guest.device.requests] == [b"AAA", b"BBB", b"CCC"]
    assert [guest.used_elem(i)[0] for i in range(3)] == [0, 2, 4]
    assert guest.interrupts == [INT_USED_BUFFER]


def test_notify_before_driver_ok_is_served_at_driver_ok(guest: Guest) -> None:
    guest.negotiate()
    guest.memory.write(AVAIL, bytes(4))
    guest.setup_queue()
    guest.request(b"early")
    assert guest.device.requests == [] and guest.used_idx() == 0
    guest.wr(Reg.STATUS, RUNNING)
    assert guest.device.requests == [(0, b"early", 64)] and guest.used_idx() == 1


def test_notify_of_a_queue_that_does_not_exist_is_ignored(guest: Guest) -> None:
    guest.start()
    guest.wr(Reg.QUEUE_NOTIFY, 7)
    assert guest.transport.stats["notify_of_idle_queue"] == 1
    assert not guest.transport.needs_reset


def test_avail_index_wraps_around(guest: Guest) -> None:
    guest.start()
    ring = guest.transport.queues[0].ring
    assert ring is not None
    # pretend 65534 requests went by: driver and device agree on the indices
    ring.next_avail = ring.next_used = 0xFFFE
    guest.avail_idx = 0xFFFE
    for i in range(5):
        guest.request(bytes([i]) * 2, head=(2 * i) % QUEUE_MAX)
        assert guest.used_idx() == (0xFFFF + i) & 0xFFFF
        assert guest.used_elem(0xFFFE + i) == ((2 * i) % QUEUE_MAX, 2)
    assert guest.avail_idx == 3 and not guest.transport.needs_reset
    assert len(guest.device.requests) == 5


# -- guest errors ------------------------------------------------------------------------------


def _head_beyond_size(g: Guest) -> None:
    g.offer(QUEUE_MAX)


def _next_beyond_size(g: Guest) -> None:
    g.set_desc(0, REQ, 4, F_NEXT, QUEUE_MAX + 3)
    g.offer(0)


def _loop(g: Guest) -> None:
    g.set_desc(0, REQ, 4, F_NEXT, 1)
    g.set_desc(1, REQ, 4, F_NEXT, 2)
    g.set_desc(2, REQ, 4, F_NEXT, 0)
    g.offer(0)


def _buffer_outside_ram(g: Guest) -> None:
    g.set_desc(0, REQ, 4, F_NEXT, 1)
    g.set_desc(1, HOLE, 16, F_WRITE)
    g.offer(0)


def _buffer_in_mmio(g: Guest) -> None:
    g.set_desc(0, BASE, 0x100)                  # the device's own registers
    g.offer(0)


def _buffer_beyond_64_bits(g: Guest) -> None:
    g.set_desc(0, (1 << 64) - 16, 0x1000)
    g.offer(0)


def _readable_after_writable(g: Guest) -> None:
    g.set_desc(0, RESP, 8, F_WRITE | F_NEXT, 1)
    g.set_desc(1, REQ, 4)
    g.offer(0)


def _indirect(g: Guest) -> None:
    g.set_desc(0, REQ, 64, VIRTQ_DESC_F_INDIRECT)
    g.offer(0)


def _absurd_length(g: Guest) -> None:
    g.set_desc(0, 0, RAM_SIZE, F_WRITE)        # all of RAM: inside it, but above the 1 MiB cap
    g.offer(0)


def _avail_idx_jump(g: Guest) -> None:
    g.memory.write(AVAIL + 2, struct.pack("<H", QUEUE_MAX + 1))
    g.wr(Reg.QUEUE_NOTIFY, 0)


def _device_refuses(g: Guest) -> None:
    g.request(b"BAD")


def _device_crashes(g: Guest) -> None:
    g.request(b"CRASH")


GUEST_ERRORS = {
    "descriptor index >= size": _head_beyond_size,
    "next index >= size": _next_beyond_size,
    "loop in a chain": _loop,
    "buffer outside RAM": _buffer_outside_ram,
    "buffer in MMIO": _buffer_in_mmio,
    "buffer beyond 2**64": _buffer_beyond_64_bits,
    "readable after writable": _readable_after_writable,
    "INDIRECT not offered": _indirect,
    "absurd length": _absurd_length,
    "avail idx jump": _avail_idx_jump,
    "device refuses the request": _device_refuses,
    "device raises": _device_crashes,
}


@pytest.mark.parametrize("name", GUEST_ERRORS)
def test_guest_error_needs_reset_and_reset_recovers(guest: Guest, name: str) -> None:
    guest.start()
    before = guest.host.read(0, RAM_SIZE)
    GUEST_ERRORS[name](guest)
    t = guest.transport
    assert guest.status == RUNNING | NEEDS_RESET
    assert t.needs_reset and t.stats["violations"] >= 1 and t.last_violation
    assert guest.interrupts == [INT_CONFIG_CHANGE]
    assert guest.rd(Reg.INTERRUPT_STATUS) == INT_CONFIG_CHANGE
    assert guest.used_idx() == 0
    # only the driver's own ring writes changed RAM; nothing was written back
    assert guest.host.read(USED, 4) == before[USED:USED + 4]

    # the VMM keeps answering, but the queue is no longer served
    assert guest.rd(Reg.MAGIC_VALUE) == MAGIC_VALUE
    assert guest.rd(0x100, 4) == 0x55667788
    served = len(guest.device.requests)
    guest.request(b"ignored", head=4)
    assert len(guest.device.requests) == served and guest.used_idx() == 0
    assert t.stats["notify_while_needs_reset"] == 1

    # reset recovers
    resets = guest.device.resets
    guest.wr(Reg.STATUS, 0)
    assert guest.status == 0 and guest.rd(Reg.INTERRUPT_STATUS) == 0
    assert guest.device.resets == resets + 1
    assert guest.rd(Reg.QUEUE_READY) == 0
    guest.start()
    guest.request(b"again")
    assert guest.used_idx() == 1 and guest.response(0, 5) == b"niaga"


def test_device_error_does_not_undo_chains_already_served(guest: Guest) -> None:
    guest.start()
    guest.request(b"one", head=0, notify=False)
    guest.request(b"BAD", head=2)
    assert guest.used_idx() == 1 and guest.used_elem(0) == (0, 3)
    assert guest.status & NEEDS_RESET
    assert sorted(guest.interrupts) == [INT_USED_BUFFER, INT_CONFIG_CHANGE]


# -- configuration space ----------------------------------------------------------------------


def test_config_space_reads_and_writes(guest: Guest) -> None:
    assert guest.rd(0x100, 8) == 0x1122334455667788
    assert guest.rd(0x100, 4) == 0x55667788
    assert guest.rd(0x104, 4) == 0x11223344
    assert guest.rd(0x102, 2) == 0x5566
    assert guest.rd(0x107, 1) == 0x11
    assert guest.rd(0x108, 4) == 0xAABBCCDD
    guest.wr(0x108, 0xBEEF, 2)
    assert guest.device.config[8:10] == b"\xef\xbe"


@pytest.mark.parametrize("offset, size", [(0x10C, 4), (0x1F8, 8), (0x101, 2), (0x102, 4), (0x100, 3)])
def test_bad_config_access_is_ignored(guest: Guest, offset: int, size: int) -> None:
    config = bytes(guest.device.config)
    assert guest.rd(offset, size) == 0
    guest.wr(offset, 0xFFFFFFFF, size)
    assert bytes(guest.device.config) == config
    assert guest.transport.stats["bad_config_access"] == 2


def test_config_change_bumps_generation_and_interrupts_once_running(guest: Guest) -> None:
    generation = guest.rd(Reg.CONFIG_GENERATION)
    guest.device.change_config()                # before DRIVER_OK: no interrupt
    assert guest.rd(Reg.CONFIG_GENERATION) == generation + 1
    assert guest.interrupts == []
    guest.start()
    guest.device.change_config()
    assert guest.rd(Reg.CONFIG_GENERATION) == generation + 2
    assert guest.interrupts == [INT_CONFIG_CHANGE]
    assert guest.rd(Reg.INTERRUPT_STATUS) == INT_CONFIG_CHANGE
    guest.wr(Reg.INTERRUPT_ACK, INT_CONFIG_CHANGE)
    assert guest.rd(Reg.INTERRUPT_STATUS) == 0


def test_close_detaches_from_the_device(guest: Guest) -> None:
    assert len(guest.device.config_change_notifiers) == 1
    guest.transport.close()
    assert len(guest.device.config_change_notifiers) == 0


def test_linux_command_line(guest: Guest) -> None:
    t = VirtioMmioTransport(EchoDevice(), guest.memory, gsi=5, base=0xD0000000)
    assert t.linux_cmdline() == "virtio_mmio.device=512@0xd0000000:5"
    with pytest.raises(ValueError):
        VirtioMmioTransport(EchoDevice(), guest.memory).linux_cmdline()


def test_bad_construction_is_refused(guest: Guest) -> None:
    odd = EchoDevice()
    odd.queue_max_sizes = (6,)
    with pytest.raises(ValueError, match="power of two"):
        VirtioMmioTransport(odd, guest.memory)
    with pytest.raises(TypeError):
        VirtioMmioTransport(EchoDevice(), guest.space)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gsi"):
        VirtioMmioTransport(EchoDevice(), guest.memory, vm=object())  # type: ignore[arg-type]


# -- robustness ------------------------------------------------------------------------------

_ACCESSES = st.lists(st.tuples(
    st.booleans(),
    st.one_of(st.sampled_from([int(r) for r in Reg]), st.integers(0, 0x1FF)),
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.integers(0, 16), st.integers(0, 0xFFFFFFFF),
              st.sampled_from([DESC, AVAIL, USED, 0x5F, 0xFF, RUNNING]))),
    max_size=60)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=_ACCESSES, ring=st.binary(min_size=4 + 16 * QUEUE_MAX, max_size=4 + 16 * QUEUE_MAX))
def test_random_register_traffic_never_crashes(guest: Guest, accesses: list[tuple[bool, int, int, int]],
                                               ring: bytes) -> None:
    guest.wr(Reg.STATUS, 0)
    guest.memory.write(DESC, ring)
    guest.memory.write(AVAIL, ring[:4 + 2 * QUEUE_MAX])
    for is_write, offset, size, value in accesses:
        if offset + size > 0x200:
            continue
        if is_write:
            guest.wr(offset, value & ((1 << (8 * size)) - 1), size)
        else:
            assert 0 <= guest.rd(offset, size) < 1 << (8 * size)
    assert guest.rd(Reg.MAGIC_VALUE) == MAGIC_VALUE
    assert guest.status & ~0xFF == 0
    # whatever state the traffic left behind, a reset brings back a working device
    guest.start()
    guest.request(b"fine", capacity=4)
    assert guest.used_idx() == 1 and guest.response(0, 4) == b"enif"


# -- KVM: irqfd and ioeventfd on a real VM ---------------------------------------------------

KVM_RAM = 0xC0000             # 768 KiB of RAM, then the transport (real-mode reachable)
CODE = 0x8000


@pytest.mark.kvm
def test_ioeventfd_and_irqfd_on_a_real_vm(vm) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.kvm import exits

    vm.create_irqchip()
    g = Guest(vm=vm, gsi=5, ram_size=KVM_RAM, base=KVM_RAM)
    try:
        t = g.transport
        assert t.irq_fd is not None
        vm.add_memslot(0, KVM_RAM, g.host.address)
        g.start()
        g.request(b"kvm", head=2, notify=False)

        fd = t.attach_ioeventfd()
        assert fd == t.notify_fd and t.attach_ioeventfd() == fd
        assert t.poll_notifications() == 0            # nothing signalled yet

        # 16-bit real mode: ds = base >> 4; QueueNotify (ds:0x50) <- eax = 0;
        # then `out 0x10, al` to come back (with an in-kernel irqchip hlt would not exit)
        code = bytes.fromhex("b800c0" "8ed8" "6631c0" "66a35000" "e610" "f4")
        g.host.write(CODE, code)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 0x2
        vcpu.set_regs(regs)

        exit_ = vcpu.run()
        # KVM took the write: the first exit is the port write, no MMIO exit came before
        assert isinstance(exit_, exits.IoExit) and exit_.port == 0x10, exit_
        assert g.device.requests == []
        assert t.poll_notifications() == 1
        assert g.device.requests == [(0, b"kvm", 64)]
        assert g.used_idx() == 1 and g.response(2, 3) == b"mvk"
        # the used-buffer interrupt went to the irqfd (written without error), not the callback
        assert t.stats["interrupts"] == 1 and g.interrupts == []
        assert t.interrupt_status == INT_USED_BUFFER
        assert t.poll_notifications() == 0

        t.detach_ioeventfd()
        assert t.notify_fd is None
    finally:
        g.close()
    assert t.irq_fd is None
    with pytest.raises(OSError):
        os.fstat(fd)
