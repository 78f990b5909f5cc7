"""The test guest does block I/O through memory it has just plugged, served by
a real ``qemu-storage-daemon`` over vhost-user-blk (issue 15, point 6).

The guest (``kvmmem.blk=N``, tests/guest/virtio_blk.c) plugs two blocks of
the virtio-mem device per round, writes a sector from a buffer in the first
and reads it back into a buffer in the second, checks it and unplugs both.
The back-end can only do that if the memslots of those blocks were mirrored
to it after they were plugged. While the guest runs, each round is checked
against the device, KVM and the front-end (the back-end is shown exactly
KVM's memslots of the device, and both buffers lie in them); afterwards the
raw image file must hold the pattern in each sector the guest reports, and
nothing else.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from serial_lines import SerialLines
from test_cli import run as run_cli
from vhost_helpers import Backend, start_backend
from vmem_helpers import GiB, MiB, expected_ranges, kvm_ranges, memslots_to_map

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = [pytest.mark.kvm, pytest.mark.vhost]

ROUNDS = 3
IMAGE_SIZE = MiB
RAM_SIZE = 512 * MiB
BLK_KEY = 0x6B766D6D626C6B00          # the guest's pattern: word at disk offset o is o ^ BLK_KEY
IO_SIZE = 4096                        # bytes per guest transfer
GUEST_OK = 1                          # the guest wrote 0 to port 0xf4: (0 << 1) | 1
ROUND = re.compile(r"blk round (\d+): sector (\d+) written from (0x[0-9a-f]+) "
                   r"read into (0x[0-9a-f]+) ok")


def pattern(offset: int, size: int = IO_SIZE) -> bytes:
    """What the guest writes at byte ``offset`` of the disk."""
    return b"".join(((offset + i) ^ BLK_KEY).to_bytes(8, "little") for i in range(0, size, 8))


def check_image(image: Path, sectors: list[int]) -> None:
    """Each reported sector holds the pattern; every other byte is still zero."""
    data = image.read_bytes()
    assert len(data) == IMAGE_SIZE
    expected = bytearray(IMAGE_SIZE)
    for sector in sectors:
        start = sector * 512
        expected[start:start + IO_SIZE] = pattern(start)
        assert data[start:start + IO_SIZE] == expected[start:start + IO_SIZE], f"sector {sector}"
    assert data == bytes(expected)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Backend]:
    b = start_backend(tmp_path, size=IMAGE_SIZE)
    yield b
    b.kill()


class BlkGuest:
    """The test guest with kvmmem.blk=N next to a virtio-mem device in ``mode``."""

    def __init__(self, guest: Path, backend: Backend, mode: str, rounds: int = ROUNDS) -> None:
        self._serial = SerialLines(self._on_line)
        self.lines = self._serial.lines
        self.rounds: list[tuple[int, int, int, int]] = []   # round, sector, write buf, read buf
        self.memslots: list[set[int]] = []        # the device memslots each round's buffers are in
        self.failures: list[str] = []
        self.sent: list[Counter[str]] = []        # the front-end's requests at start and at the end
        memdev = HostMemory(4 * GiB, "mem0", shared=True)
        device = VirtioMemProps(id="vmem0", memdev=memdev, requested_size=3 * GiB,
                                memslots=MemslotMode(mode))
        disk = VhostUserBlkProps(id="disk0", chardev="c0", path=backend.socket)
        self.machine = Machine(MachineConfig(
            ram_size=RAM_SIZE, kernel=str(guest), maxmem=RAM_SIZE + 8 * GiB,
            cmdline=f"kvmmem.blk={rounds}", memory_devices=[device], serial=self._serial,
            vhost_devices=[disk], ram_backend=HostMemory(RAM_SIZE, "pc.ram", shared=True)))
        self.dev = self.machine.devices["vmem0"]
        self.vhost = self.machine.vhost.devices["disk0"]

    def _on_line(self, line: str) -> None:
        try:
            self.on_line(line)
        except AssertionError as exc:       # keep the run going; report at the end
            self.failures.append(f"{line!r}: {exc}")

    def on_line(self, line: str) -> None:
        if line.startswith("virtio-blk: "):
            assert f" capacity={IMAGE_SIZE // 512} " in line
            self.sent.append(Counter(self.vhost.frontend.sent))
        if line.startswith("blk: "):
            self.sent.append(Counter(self.vhost.frontend.sent))
        m = ROUND.fullmatch(line)
        if m is None:
            return
        r, sector, wbuf, rbuf = int(m[1]), int(m[2]), int(m[3], 16), int(m[4], 16)
        self.rounds.append((r, sector, wbuf, rbuf))
        dev, bs = self.dev, self.dev.block_size
        self.memslots.append({(buf - dev.addr) // dev.memslot_size for buf in (wbuf, rbuf)})
        # the buffers lie in two different blocks of the device, both plugged now
        blocks = {(buf - dev.addr) // bs for buf in (wbuf, rbuf)}
        assert all(dev.addr <= buf < dev.addr + dev.usable_region_size for buf in (wbuf, rbuf))
        bitmap = dev.bitmap
        assert bitmap is not None and len(blocks) == 2
        assert all(bitmap.is_plugged(b) for b in blocks)
        assert dev.plugged_size == 2 * bs
        # KVM holds what the mode calls for, and the back-end exactly the same ranges
        wanted = memslots_to_map(dev.props.memslots, dev.memslot_size, dev.region_size,
                                 dev.usable_region_size, bitmap)
        kvm = kvm_ranges(self.machine.vm, dev)
        if dev.props.memslots.value == "single":
            assert kvm == {(dev.addr, dev.region_size)}
        else:
            assert kvm == expected_ranges(dev, wanted)
        end = dev.addr + dev.region_size
        mirrored = {(r.desc.guest_phys_addr, r.desc.size) for r in self.vhost.listener.regions()
                    if dev.addr <= r.desc.guest_phys_addr < end}
        assert mirrored == kvm
        for buf in (wbuf, rbuf):
            assert any(a <= buf and buf + IO_SIZE <= a + n for a, n in mirrored)

    def run(self) -> int:
        try:
            return self.machine.run()
        finally:
            self.machine.close()


@pytest.mark.parametrize("mode", ["dynamic", "usable", "single"])
def test_guest_block_io_through_just_plugged_blocks(guest_elf: Path, backend: Backend,
                                                    mode: str) -> None:
    guest = BlkGuest(guest_elf, backend, mode)
    dev = guest.dev
    assert guest.run() == GUEST_OK, "\n".join(guest.lines)
    assert not guest.failures, "\n".join(guest.failures)
    assert f"blk: {ROUNDS} rounds done" in guest.lines
    assert [r[0] for r in guest.rounds] == list(range(ROUNDS))
    sectors = [r[1] for r in guest.rounds]
    assert len(set(sectors)) == ROUNDS
    assert dev.plugged_size == 0
    assert backend.proc.poll() is None
    check_image(backend.image, sectors)

    # What the guest's plugs and unplugs sent the back-end: in dynamic mode one
    # ADD_MEM_REG per memslot a round mapped and one REM_MEM_REG when it went;
    # in usable and single mode the memslots were mapped before the guest ran.
    assert len(guest.sent) == 2
    during = guest.sent[1] - guest.sent[0]
    if mode != "single":                      # 1 GiB memslots: W and R in different ones
        assert all(len(slots) == 2 for slots in guest.memslots)
    mapped = 2 * ROUNDS if mode == "dynamic" else 0
    assert during["ADD_MEM_REG"] == during["REM_MEM_REG"] == mapped
    assert during["SET_MEM_TABLE"] == 0


def test_kvmmem_run_guest_block_io(tmp_path: Path, guest_elf: Path, backend: Backend) -> None:
    """The same through ``kvmmem run``, spelled as in the README."""
    log = tmp_path / "serial.txt"
    out = run_cli("-m", "512M,maxmem=8704M", "-object", "memory-backend-memfd,id=ram,size=512M",
                  "-machine", "memory-backend=ram",
                  "-object", "memory-backend-memfd,id=mem0,size=4G",
                  "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=1G,memslots=dynamic",
                  "-chardev", f"socket,id=c0,path={backend.socket}",
                  "-device", "vhost-user-blk,chardev=c0,id=disk0",
                  "-kernel", str(guest_elf), "-append", "kvmmem.blk=2", "-serial", f"file:{log}")
    lines = log.read_text().splitlines()
    assert out.returncode == GUEST_OK, out.stderr + "\n".join(lines)
    sectors = [int(m[2]) for m in map(ROUND.fullmatch, lines) if m]
    assert len(sectors) == 2 and "blk: 2 rounds done" in lines
    check_image(backend.image, sectors)


def test_backend_dying_mid_run_is_seen_by_the_guest_as_needs_reset(guest_elf: Path,
                                                                     backend: Backend) -> None:
    """The back-end is killed after round 0: the guest's virtio-mem requests go on,
    its next block request ends in DEVICE_NEEDS_RESET, and the VMM keeps running."""
    guest = BlkGuest(guest_elf, backend, "dynamic")
    on_line = guest.on_line
    at_error: list[tuple[int, int]] = []      # plugged size, the disk's Status register

    def kill_after_round_0(line: str) -> None:
        on_line(line)
        if line.startswith("blk round 0:"):
            backend.kill()
        if line.startswith("error:"):
            assert transport is not None
            at_error.append((guest.dev.plugged_size, transport.read(0x70, 4)))

    guest.on_line = kill_after_round_0  # type: ignore[method-assign]
    block, transport = guest.dev.block_size, guest.vhost.transport
    status = guest.run()
    assert "error: virtio-blk device needs reset" in guest.lines, "\n".join(guest.lines)
    assert status == 3                        # the guest wrote 1 to port 0xf4
    assert len(guest.rounds) == 1 and not guest.failures
    # round 1's blocks were plugged after the death; the disk shows DEVICE_NEEDS_RESET
    assert len(at_error) == 1 and at_error[0][0] == 2 * block and at_error[0][1] & 0x40
    check_image(backend.image, [guest.rounds[0][1]])
