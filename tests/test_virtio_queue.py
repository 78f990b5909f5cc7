"""Guest memory access and split virtqueues, against real host memory (no KVM)."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvmmem.memory import AddressSpace, HostMemory, MemoryRegion, memory_transaction
from kvmmem.memory.guest_memory import GuestMemory, GuestMemoryError
from kvmmem.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    QueueViolation,
    SplitQueue,
    ring_layout,
)

MIB = 1 << 20
RAM_SIZE = 2 * MIB          # [0, 2 MiB)
RAM2_BASE = RAM_SIZE        # a second RAM region right after it, [2, 3 MiB)
RAM2_SIZE = MIB
ROM_BASE = 0x400000
MMIO_BASE = 0x500000
HOLE = 0x600000             # nothing mapped here

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
BUF = 0x10000
F_NEXT, F_WRITE = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE


class Machine:
    """Guest RAM in two host mappings, a ROM, an MMIO window and holes."""

    def __init__(self) -> None:
        self.host = HostMemory(RAM_SIZE, "ram")
        self.host2 = HostMemory(RAM2_SIZE, "ram2")
        self.rom_host = HostMemory(0x10000, "rom")
        self.root = MemoryRegion.container("system", 1 << 32)
        self.ram = MemoryRegion.ram("ram", self.host)
        self.ram2 = MemoryRegion.ram("ram2", self.host2)
        self.rom = MemoryRegion.ram("rom", self.rom_host, readonly=True)
        self.mmio = MemoryRegion.io("dev", 0x1000, read=lambda o, s: 0, write=lambda o, s, v: None)
        with memory_transaction():
            self.root.add_subregion(0, self.ram)
            self.root.add_subregion(RAM2_BASE, self.ram2)
            self.root.add_subregion(ROM_BASE, self.rom)
            self.root.add_subregion(MMIO_BASE, self.mmio)
        self.space = AddressSpace(self.root, "memory")
        self.memory = GuestMemory(self.space)

    def close(self) -> None:
        self.space.destroy()
        for host in (self.host, self.host2, self.rom_host):
            host.close()


@pytest.fixture
def machine() -> Iterator[Machine]:
    m = Machine()
    yield m
    m.close()


class Driver:
    """The driver's side of a split ring, written straight into guest memory."""

    def __init__(self, memory: GuestMemory, size: int, desc: int = DESC, avail: int = AVAIL,
                 used: int = USED, avail_idx: int = 0) -> None:
        self.memory, self.size = memory, size
        self.desc, self.avail, self.used = desc, avail, used
        self.avail_idx = avail_idx
        self.set_avail_idx(avail_idx)

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.memory.write(self.desc + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def set_avail_idx(self, idx: int) -> None:
        self.memory.write(self.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def offer(self, head: int) -> None:
        slot = self.avail_idx % self.size
        self.memory.write(self.avail + 4 + 2 * slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack("<II", self.memory.read(self.used + 4 + 8 * (slot % self.size), 8))


def make_queue(machine: Machine, size: int = 8, **kwargs: int) -> tuple[SplitQueue, Driver]:
    start = kwargs.get("next_avail", 0)
    driver = Driver(machine.memory, size, avail_idx=start)
    queue = SplitQueue(machine.memory, size, DESC, AVAIL, USED, max_size=256, **kwargs)
    return queue, driver


# -- guest memory -------------------------------------------------------------------


def test_read_write_reach_the_host_memory_of_the_ram_region(machine: Machine) -> None:
    machine.memory.write(0x1234, b"hello")
    assert machine.host.read(0x1234, 5) == b"hello"
    machine.host2.write(0x10, b"abc")
    assert machine.memory.read(RAM2_BASE + 0x10, 3) == b"abc"


def test_access_spanning_two_ram_ranges_is_split(machine: Machine) -> None:
    data = bytes(range(64))
    machine.memory.write(RAM2_BASE - 32, data)
    assert machine.host.read(RAM_SIZE - 32, 32) == data[:32]
    assert machine.host2.read(0, 32) == data[32:]
    assert machine.memory.read(RAM2_BASE - 32, 64) == data


@pytest.mark.parametrize("gpa, size, where", [
    (HOLE, 4, HOLE),                                # nothing mapped
    (RAM2_BASE + RAM2_SIZE - 2, 4, RAM2_BASE + RAM2_SIZE),   # runs off the end of RAM
    (MMIO_BASE + 8, 4, MMIO_BASE + 8),              # an I/O region is no RAM
    ((1 << 64) - 2, 4, None),                       # beyond the 64-bit space
    (-8, 4, None),
])
def test_access_outside_ram_is_refused_with_the_address(machine: Machine, gpa: int, size: int,
                                                         where: int | None) -> None:
    before = machine.host.read(RAM2_BASE - 16, 16)
    for access in (lambda: machine.memory.read(gpa, size),
                   lambda: machine.memory.write(gpa, b"\xff" * size)):
        with pytest.raises(GuestMemoryError) as info:
            access()
        if where is not None:
            assert f"{where:#x}" in str(info.value)
    assert not machine.memory.is_ram(gpa, size)
    assert machine.host.read(RAM2_BASE - 16, 16) == before


def test_rom_is_readable_but_not_writable(machine: Machine) -> None:
    machine.rom_host.write(0, b"rom!")
    assert machine.memory.read(ROM_BASE, 4) == b"rom!"
    with pytest.raises(GuestMemoryError, match="read-only"):
        machine.memory.write(ROM_BASE, b"xxxx")
    assert machine.rom_host.read(0, 4) == b"rom!"


def test_a_commit_takes_effect_at_once(machine: Machine) -> None:
    machine.memory.write(RAM2_BASE, b"x")               # warm the last-range cache
    machine.root.del_subregion(machine.ram2)
    with pytest.raises(GuestMemoryError):
        machine.memory.read(RAM2_BASE, 1)
    machine.root.add_subregion(RAM2_BASE, machine.ram2)
    assert machine.memory.read(RAM2_BASE, 1) == b"x"


def test_protected_host_memory_is_refused_not_faulted(machine: Machine) -> None:
    machine.host2.protect(0, 0x1000)
    with pytest.raises(GuestMemoryError):
        machine.memory.read(RAM2_BASE + 8, 8)
    with pytest.raises(GuestMemoryError):
        machine.memory.write(RAM2_BASE - 4, b"12345678")    # spans into the protected page
    machine.host2.unprotect(0, 0x1000)


def test_empty_access_touches_nothing(machine: Machine) -> None:
    assert machine.memory.read(HOLE, 0) == b""
    machine.memory.write(HOLE, b"")


# -- queue setup ------------------------------------------------------------------------


@pytest.mark.parametrize("size, desc, avail, used, message", [
    (6, DESC, AVAIL, USED, "power of two"),
    (0, DESC, AVAIL, USED, "power of two"),
    (512, DESC, AVAIL, USED, "power of two"),             # above max_size 256
    (8, DESC + 8, AVAIL, USED, "aligned"),
    (8, DESC, AVAIL + 1, USED, "aligned"),
    (8, DESC, AVAIL, USED + 2, "aligned"),
    (8, HOLE, AVAIL, USED, "outside guest RAM"),
    (8, DESC, MMIO_BASE, USED, "outside guest RAM"),
    (8, DESC, AVAIL, ROM_BASE, "outside guest RAM"),        # the used ring must be writable
    (8, RAM2_BASE + RAM2_SIZE - 64, AVAIL, USED, "outside guest RAM"),
])
def test_bad_queue_setup_is_a_violation(machine: Machine, size: int, desc: int, avail: int,
                                        used: int, message: str) -> None:
    with pytest.raises(QueueViolation, match=message):
        SplitQueue(machine.memory, size, desc, avail, used, max_size=256)


def test_ring_layout_matches_the_specification() -> None:
    assert ring_layout(256) == (4096, 6 + 512, 6 + 2048)


# -- chains ------------------------------------------------------------------------------


def test_empty_queue_pops_nothing(machine: Machine) -> None:
    queue, _ = make_queue(machine)
    assert queue.pending() == 0
    assert queue.pop() is None


def test_chain_roundtrip(machine: Machine) -> None:
    queue, driver = make_queue(machine)
    machine.memory.write(BUF, b"head")
    machine.memory.write(BUF + 0x100, b"-tail")
    driver.set_desc(3, BUF, 4, F_NEXT, 5)
    driver.set_desc(5, BUF + 0x100, 5, F_NEXT, 1)
    driver.set_desc(1, BUF + 0x200, 3, F_WRITE | F_NEXT, 2)
    driver.set_desc(2, RAM2_BASE, 16, F_WRITE)
    driver.offer(3)
    assert queue.pending() == 1

    chain = queue.pop()
    assert chain is not None and chain.head == 3
    assert [(b.addr, b.length) for b in chain.readable] == [(BUF, 4), (BUF + 0x100, 5)]
    assert chain.readable_length == 9 and chain.writable_length == 19
    assert queue.read_request(chain) == b"head-tail"
    assert queue.write_response(chain, b"abcdef") == 6
    assert machine.memory.read(BUF + 0x200, 3) == b"abc"
    assert machine.memory.read(RAM2_BASE, 3) == b"def"
    queue.push(chain.head, 6)
    assert driver.used_idx() == 1
    assert driver.used_elem(0) == (3, 6)
    assert queue.pop() is None


def test_response_larger_than_the_writable_buffers_is_refused(machine: Machine) -> None:
    queue, driver = make_queue(machine)
    driver.set_desc(0, BUF, 4, F_WRITE)
    driver.offer(0)
    chain = queue.pop()
    assert chain is not None
    with pytest.raises(ValueError):
        queue.write_response(chain, b"12345")
    assert machine.memory.read(BUF, 4) == b"\0\0\0\0"


def test_indices_wrap_around_at_2_16(machine: Machine) -> None:
    queue, driver = make_queue(machine, size=4, next_avail=0xFFFE, next_used=0xFFFE)
    for i in range(6):
        driver.set_desc(i % 4, BUF + 16 * i, 8, F_WRITE)
        driver.offer(i % 4)
        chain = queue.pop()
        assert chain is not None and chain.head == i % 4
        queue.push(chain.head, i)
        assert driver.used_elem((0xFFFE + i) & 0xFFFF) == (i % 4, i)
    assert queue.next_avail == 4 and driver.avail_idx == 4
    assert driver.used_idx() == 4


def test_a_full_ring_is_pending_entirely(machine: Machine) -> None:
    queue, driver = make_queue(machine, size=4, next_avail=0xFFFF)
    for i in range(4):
        driver.set_desc(i, BUF, 1)
        driver.offer(i)
    assert queue.pending() == 4
    assert [queue.pop().head for _ in range(4)] == [0, 1, 2, 3]  # type: ignore[union-attr]


# -- violations ---------------------------------------------------------------------------


def _head_beyond_size(d: Driver) -> None:
    d.offer(8)


def _next_beyond_size(d: Driver) -> None:
    d.set_desc(0, BUF, 4, F_NEXT, 9)
    d.offer(0)


def _loop(d: Driver) -> None:
    d.set_desc(0, BUF, 4, F_NEXT, 1)
    d.set_desc(1, BUF, 4, F_NEXT, 0)
    d.offer(0)


def _self_loop(d: Driver) -> None:
    d.set_desc(2, BUF, 4, F_NEXT, 2)
    d.offer(2)


def _buffer_in_hole(d: Driver) -> None:
    d.set_desc(0, HOLE, 4)
    d.offer(0)


def _buffer_past_ram_end(d: Driver) -> None:
    d.set_desc(0, RAM2_BASE + RAM2_SIZE - 4, 8, F_WRITE)
    d.offer(0)


def _buffer_in_mmio(d: Driver) -> None:
    d.set_desc(0, MMIO_BASE, 4)
    d.offer(0)


def _writable_buffer_in_rom(d: Driver) -> None:
    d.set_desc(0, ROM_BASE, 4, F_WRITE)
    d.offer(0)


def _huge_buffer_address(d: Driver) -> None:
    d.set_desc(0, (1 << 64) - 8, 0xFFFF_FFFF)
    d.offer(0)


def _readable_after_writable(d: Driver) -> None:
    d.set_desc(0, BUF, 4, F_WRITE | F_NEXT, 1)
    d.set_desc(1, BUF + 16, 4)
    d.offer(0)


def _indirect(d: Driver) -> None:
    d.set_desc(0, BUF, 32, VIRTQ_DESC_F_INDIRECT)
    d.offer(0)


def _chain_too_long(d: Driver) -> None:
    d.set_desc(0, 0, MAX_CHAIN_BYTES // 2, F_NEXT, 1)
    d.set_desc(1, MAX_CHAIN_BYTES // 2, MAX_CHAIN_BYTES // 2 + 1, F_WRITE)
    d.offer(0)


def _avail_idx_jump(d: Driver) -> None:
    d.set_desc(0, BUF, 4)
    d.set_avail_idx(9)


VIOLATIONS = {
    "head beyond size": _head_beyond_size,
    "next beyond size": _next_beyond_size,
    "loop": _loop,
    "self loop": _self_loop,
    "buffer in hole": _buffer_in_hole,
    "buffer past RAM end": _buffer_past_ram_end,
    "buffer in MMIO": _buffer_in_mmio,
    "writable buffer in ROM": _writable_buffer_in_rom,
    "buffer beyond 2**64": _huge_buffer_address,
    "readable after writable": _readable_after_writable,
    "indirect": _indirect,
    "chain too long": _chain_too_long,
    "avail idx jump": _avail_idx_jump,
}


@pytest.mark.parametrize("name", VIOLATIONS)
def test_malformed_input_is_a_violation(machine: Machine, name: str) -> None:
    queue, driver = make_queue(machine)
    VIOLATIONS[name](driver)
    with pytest.raises(QueueViolation):
        queue.pop()
    assert driver.used_idx() == 0


def test_ring_memory_unmapped_after_setup_is_a_violation(machine: Machine) -> None:
    driver = Driver(machine.memory, 8, avail=RAM2_BASE)
    queue = SplitQueue(machine.memory, 8, DESC, RAM2_BASE, USED)
    driver.set_desc(0, BUF, 4)
    driver.offer(0)
    machine.root.del_subregion(machine.ram2)
    with pytest.raises(QueueViolation):
        queue.pop()


def test_chain_of_exactly_queue_size_descriptors_is_fine(machine: Machine) -> None:
    queue, driver = make_queue(machine, size=4)
    for i in range(4):
        driver.set_desc(i, BUF + i, 1, F_NEXT if i < 3 else 0, i + 1)
    driver.offer(0)
    chain = queue.pop()
    assert chain is not None and len(chain.readable) == 4


def _mostly(valid: st.SearchStrategy[int], wild: st.SearchStrategy[int]) -> st.SearchStrategy[int]:
    """Valid values four times in five, so that many chains get through."""
    return st.sampled_from([True, True, True, True, False]).flatmap(
        lambda ok: valid if ok else wild)


_ADDRESSES = _mostly(st.integers(0, RAM_SIZE + RAM2_SIZE - 0x2000),
                     st.one_of(st.sampled_from([RAM2_BASE + RAM2_SIZE - 8, ROM_BASE, MMIO_BASE,
                                                HOLE, (1 << 64) - 8]),
                               st.integers(0, (1 << 64) - 1)))
_DESCRIPTORS = st.lists(
    st.tuples(_ADDRESSES,
              _mostly(st.integers(0, 0x1000), st.integers(0, (1 << 32) - 1)),
              _mostly(st.sampled_from([0, F_NEXT, F_WRITE, F_WRITE | F_NEXT]),
                      st.integers(0, 0xFFFF)),
              _mostly(st.integers(0, 7), st.integers(0, 0xFFFF))),
    min_size=8, max_size=8)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descriptors=_DESCRIPTORS,
       avail_idx=_mostly(st.integers(1, 8), st.integers(0, 0xFFFF)),
       heads=st.lists(_mostly(st.integers(0, 7), st.integers(0, 0xFFFF)),
                      min_size=8, max_size=8))
def test_random_ring_contents_never_escape_guest_ram(
        machine: Machine, descriptors: list[tuple[int, int, int, int]], avail_idx: int,
        heads: list[int]) -> None:
    """Whatever the driver writes, pop() either raises QueueViolation or
    yields chains whose every buffer is guest RAM (writable ones writable)."""
    queue, driver = make_queue(machine)
    for i, (addr, length, flags, nxt) in enumerate(descriptors):
        driver.set_desc(i, addr, length, flags, nxt)
    for head in heads:
        driver.offer(head)
    driver.set_avail_idx(avail_idx)
    served = 0
    try:
        while (chain := queue.pop()) is not None:
            served += 1
            assert served <= 8
            assert len(chain.readable) + len(chain.writable) <= 8
            assert chain.readable_length + chain.writable_length <= MAX_CHAIN_BYTES
            for b in chain.readable:
                assert machine.memory.is_ram(b.addr, b.length)
            for b in chain.writable:
                assert machine.memory.is_ram(b.addr, b.length, write=True)
            queue.read_request(chain)
            queue.push(chain.head, queue.write_response(chain, b"\xa5" * min(chain.writable_length, 16)))
    except QueueViolation:
        event("violation")
    event(f"served {min(served, 2)}+ chains")
