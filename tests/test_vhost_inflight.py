"""Memslot changes never move plugged memory under a vhost-user request in flight (issue 19).

A real qemu-storage-daemon serves the disk behind a throttle group, so a
512 KiB request stays in flight for a few hundred milliseconds after the
daemon took it from the ring (and translated its buffer into its own
mapping of guest memory). While it is in flight the machine changes its
memslots in every way it can: ``exact``'s deferred merge, the split an unplug
next to the buffer causes, coarsening over the budget, a resize, a system
reset. Then the request must have completed OK, the disk image must hold
exactly the bytes of the buffer (a WRITE) or the buffer exactly the bytes
of the disk (a READ), and the daemon must still serve the next request.

The memslot modes that never replace a memslot over plugged memory
(``dynamic``, ``usable``, ``single``) run the same steps: they must pass as
they are. Most tests drive the I/O from the host-side driver of
``vhost_helpers`` (the guest's part: rings and buffers in guest RAM, the kick
through the transport's ioeventfd), so that each change can be placed
exactly; the last one boots the test guest, whose own driver keeps a write
and a read in flight while it unplugs a block next to the buffer
(``kvmmem.blk_inflight``). KVM, the memslots and the daemon are real.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from serial_lines import SerialLines
from vhost_helpers import (
    SECTOR,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Backend,
    GiB,
    HostBlkDriver,
    MiB,
    start_backend,
)

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response
from kvmmem.memory import HostMemory
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.vhost, pytest.mark.slow]

BLOCK = 2 * MiB
IO = 512 * 1024                     # bytes per request: in flight for ~0.4 s at BPS
BPS = 1 << 20                       # the throttle group's bytes per second
RAM = 256 * MiB
RING = 0x8000000                    # the driver's ring and headers, in boot RAM (past the guest)
MODES = [m.value for m in MemslotMode]
MANUAL = 3_600_000                  # a merge-delay the test outlasts: it merges itself


def pattern(seed: int, size: int = IO) -> bytes:
    return bytes((i * 131 + seed * 17 + (i >> 9)) & 0xFF for i in range(size))


@dataclass
class Rig:
    machine: Machine
    dev: VirtioMem
    drv: HostBlkDriver
    backend: Backend

    def send(self, type: RequestType, block: int = 0, n: int = 1) -> str:
        with self.machine.lock:               # as the vCPU thread or QMP would
            raw = self.dev.handle(0, Request(type, self.dev.addr + block * BLOCK, n).pack(), 10)
        assert raw is not None
        return Response.parse(raw).type.name

    def plug(self, *blocks: int) -> None:
        for b in blocks:
            assert self.send(RequestType.PLUG, b) == "ACK"

    def gpa(self, block: int, offset: int = 0) -> int:
        return self.dev.addr + block * BLOCK + offset

    def in_flight(self, kind: int, sector: int, gpa: int, change: Callable[[], object]) -> int:
        """Start a request, make sure the daemon holds it, run ``change`` meanwhile;
        the request's status."""
        ticket = self.drv.begin(kind, sector, gpa, IO)
        assert not self.drv.done(ticket)
        with self.machine.lock:
            change()
        # (with the fix the change waited for the request; without it, it did not)
        return self.drv.finish(ticket, timeout=30)

    def write_and_change(self, block: int, change: Callable[[], object], seed: int = 1) -> None:
        """A WRITE from ``block`` in flight across ``change``: status OK, disk = buffer."""
        data = pattern(seed)
        gpa = self.gpa(block, BLOCK // 4)
        self.machine.guest_memory.write(gpa, data)
        sector = 8 * seed
        assert self.in_flight(VIRTIO_BLK_T_OUT, sector, gpa, change) == 0
        assert self.backend.read_image(sector * SECTOR, IO) == data
        self.check_next_request()

    def read_and_change(self, block: int, change: Callable[[], object], seed: int = 2) -> None:
        """A READ into ``block`` in flight across ``change``: status OK, buffer = disk."""
        data = pattern(seed)
        gpa = self.gpa(block, BLOCK // 4)
        sector = 8 * seed
        with open(self.backend.image, "r+b") as f:
            f.seek(sector * SECTOR)
            f.write(data)
        self.machine.guest_memory.write(gpa, bytes(IO))
        assert self.in_flight(VIRTIO_BLK_T_IN, sector, gpa, change) == 0
        assert self.machine.guest_memory.read(gpa, IO) == data
        self.check_next_request()

    def check_next_request(self) -> None:
        """The daemon still works (it broke on a request completed into a stopped ring)."""
        gpa = RING + 0x10000
        self.machine.guest_memory.write(gpa, b"\x5a" * 4096)
        assert self.drv.submit(VIRTIO_BLK_T_OUT, 4096, gpa, 4096, timeout=30) == 0
        assert self.backend.read_image(4096 * SECTOR, 4096) == b"\x5a" * 4096


@pytest.fixture
def rig_factory(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    made: list[tuple[Machine, Backend]] = []

    def make(mode: str, size: int = 32 * GiB, requested: int = 1 * GiB, merge_delay: int = 0,
             max_memslots: int = 0) -> Rig:
        backend = start_backend(tmp_path, size=64 * MiB, bps=BPS)
        props = VirtioMemProps(id="vmem0", memdev=HostMemory(size, "mem0", shared=True),
                               block_size=BLOCK, memslots=MemslotMode(mode),
                               requested_size=requested, merge_delay=merge_delay,
                               max_memslots=max_memslots)
        machine = Machine(MachineConfig(
            ram_size=RAM, kernel=str(guest_elf_path()), maxmem=RAM + size,
            memory_devices=[props], ram_backend=HostMemory(RAM, "pc.ram", shared=True),
            vhost_devices=[VhostUserBlkProps(id="disk0", chardev="c0", path=backend.socket)]))
        made.append((machine, backend))
        drv = HostBlkDriver(machine.transports[1], machine.guest_memory, ring_gpa=RING)
        drv.setup()
        # One request first: the throttle lets the first one through at once,
        # the next ones wait for the bucket to drain.
        machine.guest_memory.write(RING + 0x10000, bytes(IO))
        assert drv.submit(VIRTIO_BLK_T_OUT, 2048, RING + 0x10000, IO) == 0
        return Rig(machine, machine.devices["vmem0"], drv, backend)

    yield make
    for machine, backend in made:
        machine.close()
        backend.kill()


def guest_elf_path() -> Path:
    path = Path(__file__).resolve().parent.parent / "build" / "guest" / "guest.elf"
    if not path.exists():
        pytest.skip("the test guest is not built (make)")
    return path


@pytest.mark.parametrize("mode", MODES)
def test_write_in_flight_across_a_deferred_merge(rig_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    rig = rig_factory(mode, merge_delay=MANUAL)
    rig.plug(*range(8))                       # exact: eight 2 MiB memslots, a merge pending
    before = rig.dev.nb_memslots
    rig.write_and_change(3, rig.dev.merge_memslots)
    if mode == "exact":
        assert before == 8 and rig.dev.nb_memslots == 1     # merged into one 16 MiB memslot
    assert rig.dev.bitmap is not None and rig.dev.bitmap.plugged_count == 8


@pytest.mark.parametrize("mode", MODES)
def test_write_in_flight_across_a_split(rig_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    rig = rig_factory(mode)
    assert rig.send(RequestType.PLUG, 0, 8) == "ACK"          # exact: one 16 MiB memslot
    rig.write_and_change(3, lambda: rig.send(RequestType.UNPLUG, 5) == "ACK" or pytest.fail())
    if mode == "exact":
        assert rig.dev.nb_memslots == 7                       # blocks 0-4 and 6-7


@pytest.mark.parametrize("mode", MODES)
def test_read_in_flight_across_a_split(rig_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    rig = rig_factory(mode)
    assert rig.send(RequestType.PLUG, 0, 8) == "ACK"
    rig.read_and_change(3, lambda: rig.send(RequestType.UNPLUG, 6) == "ACK" or pytest.fail())


@pytest.mark.parametrize("mode", MODES)
def test_write_in_flight_across_coarsening(rig_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    # 2 GiB in 1 GiB memslots: exact may use 2 memslots, so a third run of
    # blocks maps grid memslot 0 whole, replacing the chunks of blocks 0 and 2.
    rig = rig_factory(mode, size=2 * GiB, requested=1 * GiB)
    rig.plug(0, 2)
    rig.write_and_change(2, lambda: rig.plug(4))
    if mode == "exact":
        assert rig.dev.nb_memslots == 1 and rig.dev.mapped_memslots == frozenset({0})


@pytest.mark.parametrize("mode", MODES)
def test_read_in_flight_across_a_resize(rig_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    rig = rig_factory(mode, merge_delay=MANUAL)
    rig.plug(*range(8))

    def resize() -> None:
        rig.dev.set_requested_size(4 * GiB)   # usable: more memslots mapped
        rig.plug(8)                           # exact: a 2 MiB memslot next to eight
        rig.dev.merge_memslots()              # exact: merged 16 MiB + 2 MiB
        rig.dev.set_requested_size(16 * MiB)
    rig.read_and_change(3, resize)


@pytest.mark.parametrize("mode", MODES)
def test_write_in_flight_across_a_system_reset(rig_factory, mode: str) -> None:  # type: ignore[no-untyped-def]
    rig = rig_factory(mode)
    assert rig.send(RequestType.PLUG, 0, 8) == "ACK"
    data = pattern(5)
    gpa = rig.gpa(3, BLOCK // 4)
    rig.machine.guest_memory.write(gpa, data)
    # The reset waits for the request before it stops the daemon's ring and
    # unplugs the memory under it; a driver set up again then works.
    assert rig.in_flight(VIRTIO_BLK_T_OUT, 40, gpa, rig.machine.reset) == 0
    assert rig.backend.read_image(40 * SECTOR, IO) == data
    assert rig.dev.plugged_size == 0
    rig.drv = HostBlkDriver(rig.machine.transports[1], rig.machine.guest_memory, ring_gpa=RING)
    rig.drv.setup()
    rig.check_next_request()


GUEST_KEY = 0x6B766D6D626C6B00       # tests/guest/virtio_blk.c: word at disk offset o is o ^ KEY
GUEST_ROUNDS = 2
GUEST_ROUND = re.compile(r"blk inflight round (\d+): sector (\d+) ok")


def guest_pattern(offset: int, size: int) -> bytes:
    return b"".join(((offset + i) ^ GUEST_KEY).to_bytes(8, "little") for i in range(0, size, 8))


@pytest.mark.parametrize("mode", MODES)
def test_guest_io_in_flight_across_splits(guest_elf: Path, tmp_path: Path, mode: str) -> None:
    """The guest's own driver: a 512 KiB write, then a read, each in flight
    while the guest unplugs a block of the 16 MiB memslot holding the buffer
    (exact splits it; merge-delay 0 merges it again on the next plug)."""
    backend = start_backend(tmp_path, size=64 * MiB, bps=BPS)
    serial = SerialLines(lambda line: None)
    props = VirtioMemProps(id="vmem0", memdev=HostMemory(32 * GiB, "mem0", shared=True),
                           block_size=BLOCK, memslots=MemslotMode(mode), requested_size=1 * GiB,
                           merge_delay=0)
    machine = Machine(MachineConfig(
        ram_size=RAM, kernel=str(guest_elf), maxmem=RAM + 32 * GiB,
        cmdline=f"kvmmem.blk_inflight={GUEST_ROUNDS}", memory_devices=[props], serial=serial,
        ram_backend=HostMemory(RAM, "pc.ram", shared=True),
        vhost_devices=[VhostUserBlkProps(id="disk0", chardev="c0", path=backend.socket)]))
    disk = machine.vhost.devices["disk0"].device
    try:
        status = machine.run()
    finally:
        machine.close()
        backend.kill()
    lines = serial.lines
    assert status == 1, "\n".join(lines)              # the guest wrote 0 to port 0xf4
    assert f"blk inflight: {GUEST_ROUNDS} rounds done" in lines, "\n".join(lines)
    sectors = [int(m[2]) for m in map(GUEST_ROUND.fullmatch, lines) if m]
    assert sectors == [2048 * (r + 1) for r in range(GUEST_ROUNDS)]
    for sector in sectors:
        assert backend.read_image(sector * SECTOR, IO) == guest_pattern(sector * SECTOR, IO)
    # exact stopped the daemon for each merge (the eighth plug, the plug again)
    # and each split (two unplugs) of a round; the other modes never did
    assert len(disk.pauses) == (4 * GUEST_ROUNDS if mode == "exact" else 0)
