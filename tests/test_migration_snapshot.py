"""Snapshot and restore through the migration stream (issue 21): the test
guest, stopped while it hammers its plugged memory, is written to a file and
goes on in a new machine, in every memslot mode; a stream that is cut,
damaged or of another machine is refused with one clear error.

Real KVM and real guest code (tests/test_kvm_state.py's ``Run``).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_kvm_state import PLUGGED, Run
from waiting import wait_until

from kvmmem.migration import MigrationError, StreamError, StreamReader, StreamWriter, load_machine, save_machine
from kvmmem.migration.stream import Kind

pytestmark = pytest.mark.kvm


def snapshot(run: Run) -> bytes:
    out = io.BytesIO()
    run.machine.pause()
    save_machine(run.machine, StreamWriter(out))
    return out.getvalue()


def sections(data: bytes) -> list[tuple[Kind, str, bytes]]:
    reader, found = StreamReader(io.BytesIO(data)), []
    while True:
        found.append(reader.section())
        if found[-1][0] is Kind.END:
            return found


@pytest.mark.parametrize("mode", ["single", "usable", "dynamic", "exact"])
def test_a_snapshot_of_the_guest_goes_on_in_a_new_machine(guest_elf: Path, tmp_path: Path,
                                                         mode: str) -> None:
    source = Run(guest_elf, mode)
    source.thread.start()
    target: Run | None = None
    try:
        wait_until(lambda: len(source.rounds) >= 1, "the guest did not hammer")
        path = tmp_path / "snapshot"
        path.write_bytes(snapshot(source))
        last = source.rounds[-1]
        dev = source.machine.devices["vmem0"]
        runs = list(dev.bitmap.plugged_runs())             # type: ignore[union-attr]
        memslots = sorted((m.guest_phys_addr, m.memory_size)
                          for m in source.machine.vm.memslots.values())
        bs = dev.block_size
        source.finish()

        # RAM of the device only from plugged blocks, and no zero page anywhere
        ram = [(name, StreamReader.parse_ram(name, payload))
               for kind, name, payload in sections(path.read_bytes()) if kind is Kind.RAM]
        plugged = [(first * bs, (first + n) * bs) for first, n in runs]
        for name, (offset, data) in ram:
            assert len(data) % 4096 == 0 and all(any(data[i:i + 4096])
                                                 for i in range(0, len(data), 4096))
            if name == "mem0":
                assert any(a <= offset and offset + len(data) <= b for a, b in plugged)
        assert sum(len(d) for n, (_, d) in ram if n == "mem0") <= PLUGGED

        target = Run(guest_elf, mode)
        with path.open("rb") as f:
            load_machine(target.machine, StreamReader(f))
        tdev = target.machine.devices["vmem0"]
        assert list(tdev.bitmap.plugged_runs()) == runs     # type: ignore[union-attr]
        assert sorted((m.guest_phys_addr, m.memory_size)
                      for m in target.machine.vm.memslots.values()) == memslots
        target.thread.start()
        target.goes_on_after(last)
    finally:
        if source.thread.is_alive():
            source.finish()
        if target is not None:
            target.finish()
    assert not [line for line in source.serial.lines + target.serial.lines
                if "mismatch" in line or "error" in line]
    assert target.machine.unplugged.count == 0


@pytest.fixture(scope="module")
def stream(guest_elf: Path) -> bytes:
    source = Run(guest_elf, "dynamic")
    source.thread.start()
    try:
        wait_until(lambda: len(source.rounds) >= 1, "the guest did not hammer")
        return snapshot(source)
    finally:
        source.finish()


def load_into_new(guest_elf: Path, data: bytes, mode: str = "dynamic") -> None:
    target = Run(guest_elf, mode)
    try:
        load_machine(target.machine, StreamReader(io.BytesIO(data)))
    finally:
        target.machine.close()
        target.memdev.close()


@pytest.mark.parametrize("cut", [0, 5, 12, 13, 100, -5, -1])
def test_a_cut_stream_is_refused_in_one_error(guest_elf: Path, stream: bytes, cut: int) -> None:
    with pytest.raises(StreamError, match="truncated stream|bad magic"):
        load_into_new(guest_elf, stream[:cut])


def test_damaged_and_foreign_streams_are_refused(guest_elf: Path, stream: bytes) -> None:
    flipped = bytearray(stream)
    flipped[len(stream) // 2] ^= 0x40
    with pytest.raises(StreamError, match="checksum mismatch"):
        load_into_new(guest_elf, bytes(flipped))
    with pytest.raises(StreamError, match="stream version 9"):
        load_into_new(guest_elf, stream[:8] + (9).to_bytes(4, "little") + stream[12:])
    with pytest.raises(MigrationError, match="another machine: it has memory_devices="):
        load_into_new(guest_elf, stream, mode="exact")


def test_a_hostile_ram_section_for_unplugged_memory_is_refused(guest_elf: Path,
                                                               stream: bytes) -> None:
    found = sections(stream)
    out = io.BytesIO()
    writer = StreamWriter(out)
    for kind, name, payload in found[:-1]:
        writer.section(kind, name, payload)
    writer.ram("mem0", 8 << 30, b"\x01" * 4096)            # far beyond the plugged blocks
    writer.end()
    with pytest.raises(MigrationError, match="lies in unplugged blocks"):
        load_into_new(guest_elf, out.getvalue())


def test_a_machine_with_a_vhost_disk_has_a_migration_blocker(guest_elf: Path,
                                                             tmp_path: Path) -> None:
    from vhost_helpers import start_backend

    from kvmmem.memory import HostMemory
    from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
    from kvmmem.vmm.machine import Machine, MachineConfig

    backend = start_backend(tmp_path)
    m = Machine(MachineConfig(ram_size=256 << 20, kernel=str(guest_elf),
                              ram_backend=HostMemory(256 << 20, "pc.ram", shared=True),
                              vhost_devices=[VhostUserBlkProps("disk0", "c0", backend.socket)]))
    try:
        with pytest.raises(MigrationError, match="vhost-user-blk 'disk0' does not support"):
            save_machine(m, StreamWriter(io.BytesIO()))
    finally:
        m.close()
        backend.kill()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_the_reader_turns_any_bytes_into_sections_or_a_stream_error(tail: bytes) -> None:
    data = b"KVMMEMIG" + (1).to_bytes(4, "little") + tail
    try:
        reader = StreamReader(io.BytesIO(data))
        for _ in range(8):
            reader.section()
    except StreamError:
        pass
