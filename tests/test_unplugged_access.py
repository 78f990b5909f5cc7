"""A guest looping over unplugged memory leaves the VMM bounded.

Each access is counted; only the most recent are kept; the log gets at most
one line per interval and QMP clients at most one X_KVMMEM_UNPLUGGED_ACCESS
event per second (QEMU's event throttling), the last one always delivered.
"""

from __future__ import annotations

import logging
import struct
import threading
import time

import pytest
from qmp_client import QmpClient
from tiny_guest import elf, load_cr3, read_forever

from kvmmem.kvm import x86
from kvmmem.vmm.unplugged import KEEP, LOG_INTERVAL, UnpluggedAccess, UnpluggedAccessLog

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 30
POINTER = 0x31000
TABLES = 0x1000000
"""The guest's own identity map, covering device memory (16 MiB, in RAM)."""
ACCESSES = 5_000


def test_the_record_is_bounded_and_the_log_rate_limited() -> None:
    now = [100.0]
    record = UnpluggedAccessLog(keep=8, interval=1.0, clock=lambda: now[0])
    lines = [record.record(UnpluggedAccess("vmem0", 0x1000 * i, 0, False)) for i in range(1000)]
    assert record.count == 1000 and len(record.recent) == 8
    assert [a.address for a in record.recent] == [0x1000 * i for i in range(992, 1000)]
    assert lines[0] == "vCPU 0: read of unplugged/unassigned memory at 0x0 (vmem0)"
    assert lines[1:] == [None] * 999
    now[0] += 1.0
    line = record.record(UnpluggedAccess("", 0x5, 0, True))
    assert line == ("vCPU 0: write of unplugged/unassigned memory at 0x5 (999 more not logged "
                    "since the last such line; 1001 in all)")
    assert record.record(UnpluggedAccess("", 0x6, 0, True)) is None


def _unplugged_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "unplugged/unassigned memory" in r.getMessage()]


@pytest.mark.kvm
def test_guest_looping_over_unplugged_memory_leaves_the_vmm_bounded(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.devices.virtio_mem import VirtioMemProps
    from kvmmem.memory import HostMemory
    from kvmmem.vmm.machine import Machine, MachineConfig
    from kvmmem.vmm.qmp import QmpServer

    caplog.set_level(logging.WARNING)
    kernel = tmp_path / "reader.elf"
    kernel.write_bytes(elf(load_cr3(TABLES) + read_forever(POINTER)))
    device = VirtioMemProps(id="vmem0", memdev=HostMemory(GiB, "mem0"), memslots="dynamic")
    machine = Machine(MachineConfig(ram_size=64 * MiB, kernel=str(kernel),
                                    maxmem=64 * MiB + 2 * GiB, memory_devices=[device]))
    dev = machine.devices["vmem0"]
    target = dev.addr + 3 * dev.block_size                     # never plugged
    machine.memory.ram_host.write(POINTER, struct.pack("<Q", target))
    machine.memory.ram_host.write(TABLES, x86.identity_page_tables(TABLES, dev.addr + dev.region_size))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(machine.run()))
    try:
        with QmpServer(machine, tmp_path / "qmp.sock"):
            client = QmpClient(tmp_path / "qmp.sock")
            start = time.monotonic()
            thread.start()
            while machine.unplugged.count < ACCESSES:
                client.execute("query-status")             # and take the events that came
                assert thread.is_alive()
                assert time.monotonic() - start < TIMEOUT, (machine.unplugged.count, machine.resets)
            client.execute("stop")
            elapsed = time.monotonic() - start
            events = [e for e in client.events if e["event"] == "X_KVMMEM_UNPLUGGED_ACCESS"]
            count = machine.unplugged.count
            assert count >= ACCESSES and len(machine.unplugged_accesses) == KEEP
            assert {(a.device, a.address, a.is_write) for a in machine.unplugged_accesses} == \
                {("vmem0", target, False)}
            # At most one event a second and one log line an interval, however many accesses.
            assert 1 <= len(events) <= elapsed + 1 < count
            assert all(e["data"]["address"] == target and e["data"]["device"] == "vmem0"
                       for e in events)
            lines = _unplugged_messages(caplog)
            assert 1 <= len(lines) <= elapsed / LOG_INTERVAL + 1 < count
            client.execute("quit")
            thread.join(TIMEOUT)
            assert status == [0]
            client.close()
    finally:
        if thread.is_alive():
            machine.shutdown(1)
            thread.join(TIMEOUT)
        machine.close()
