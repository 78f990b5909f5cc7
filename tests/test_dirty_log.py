"""Dirty logging through the KVM memory listener (issue 21, its first part).

Real KVM, the test guest writing its plugged memory (``kvmmem.hammer=1``:
each round writes one word at the start and one in the middle of every
plugged block). What the listener reports must be exactly those pages of
the device, only for memslots that are mapped, cleared once taken, and not
lost when ``memslots=exact`` replaces a logged memslot (the listener
harvests a memslot before it deletes it, the dirty log's side of the
memory-consumer rule).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from serial_lines import SerialLines
from vmem_helpers import PLUG, UNPLUG, GiB, MiB, request
from waiting import wait_until

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.devices.virtio_mem_proto import ResponseType
from kvmmem.memory import HostMemory
from kvmmem.memory.dirty_log import DirtyLog
from kvmmem.memory.kvm_listener import KVM_MEM_LOG_DIRTY_PAGES
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.kvm

PLUGGED = 896 * MiB
PAGE = 4096
ROUND = re.compile(r"hammer round=(\d+)")


def device_pages(log: DirtyLog, memdev: HostMemory) -> set[int]:
    """The device's dirty pages (offsets in its memory), taken from the log."""
    return {offset + i for host, offset, size in log.take() if host is memdev
            for i in range(0, size, PAGE)}


@pytest.mark.parametrize("mode", ["dynamic", "exact"])
def test_the_dirty_log_reports_the_guests_writes_and_keeps_them_across_replacements(
        guest_elf: Path, mode: str) -> None:
    rounds = [0]

    def on_line(line: str) -> None:
        m = ROUND.search(line)
        if m:
            rounds[0] += 1

    serial = SerialLines(on_line)
    memdev = HostMemory(64 * GiB, "mem0")
    device = VirtioMemProps(id="vmem0", memdev=memdev, requested_size=PLUGGED, memslots=mode,
                            merge_delay=0)
    machine = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest_elf),
                                    maxmem=512 * MiB + 80 * GiB, cmdline="kvmmem.hammer=1",
                                    memory_devices=[device], serial=serial))
    dev, listener = machine.devices["vmem0"], machine.memory.kvm_listener
    bs = dev.block_size
    written = {b * bs + off for b in range(PLUGGED // bs) for off in (0, bs // 2)}
    errors: list[BaseException] = []

    def after_rounds(n: int) -> None:
        target = rounds[0] + n
        wait_until(lambda: rounds[0] >= target, f"the guest did not hammer {n} more rounds")

    def host() -> None:
        try:
            after_rounds(1)                          # the guest has plugged and hammers
            log = DirtyLog()
            with machine.lock:
                listener.start_dirty_log(log)
                assert all(m.flags & KVM_MEM_LOG_DIRTY_PAGES for m in machine.vm.memslots.values())
            after_rounds(2)
            with machine.lock:
                listener.sync_dirty_log()
            # bitmaps for what is mapped (boot RAM, the first GiB of the device
            # at most), not for the device's 64 GiB (2 MiB of bitmap)
            assert log.bitmap_bytes <= (512 * MiB + GiB) // PAGE // 8
            # exactly the two words of every plugged block: nothing unplugged,
            # nothing the guest did not write
            assert device_pages(log, memdev) == written
            machine.pause()
            with machine.lock:
                listener.sync_dirty_log()
                log.take()
                listener.sync_dirty_log()                 # nothing ran since: nothing new
                assert device_pages(log, memdev) == set()
            machine.resume()
            after_rounds(1)
            machine.pause()
            with machine.lock:
                # plugging the rest of the first GiB (exact: merges the memslots
                # under the guest's blocks, deleting them), unplugging it again
                # (a split): the writes logged in the deleted memslots survive
                tail = (PLUGGED // bs, (GiB - PLUGGED) // bs)
                dev.set_requested_size(GiB)
                assert request(dev, PLUG, *tail).type is ResponseType.ACK
                assert request(dev, UNPLUG, tail[0] + 1, tail[1] - 1).type is ResponseType.ACK
                assert all(m.flags & KVM_MEM_LOG_DIRTY_PAGES for m in machine.vm.memslots.values())
                listener.sync_dirty_log()
                assert device_pages(log, memdev) == written
                listener.stop_dirty_log()
                assert not any(m.flags & KVM_MEM_LOG_DIRTY_PAGES
                               for m in machine.vm.memslots.values())
        except BaseException as exc:
            errors.append(exc)
        finally:
            machine.shutdown(0)

    thread = threading.Thread(target=host)
    thread.start()
    try:
        status = machine.run()
    finally:
        thread.join(60)
        machine.close()
        memdev.close()
    assert not errors, errors
    assert status == 0
    assert not [line for line in serial.lines if "mismatch" in line or "error" in line]


def test_the_log_keeps_runs_in_host_offsets() -> None:
    host = HostMemory(1 << 30, "m")
    log = DirtyLog()
    log.merge(host, 2 * MiB, 512, (0b1011).to_bytes(64, "little"))
    log.mark(host, 2 * MiB + 100 * PAGE, 3 * PAGE + 1)
    assert log.pages == 3 + 4 and log.bitmap_bytes == 64 + 1
    assert log.take() == [(host, 2 * MiB, 2 * PAGE), (host, 2 * MiB + 3 * PAGE, PAGE),
                          (host, 2 * MiB + 100 * PAGE, 4 * PAGE)]
    assert log.take() == [] and log.pages == 0
    host.close()
