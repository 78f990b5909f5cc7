"""memslots=exact replaces memslots under a running guest without it noticing.

The test guest plugs 896 MiB and then keeps writing and reading every plugged
block (``kvmmem.hammer=1``). Meanwhile another thread, as QMP or a host-side
driver would, plugs and unplugs the blocks after them: plugging the last
128 MiB of the first GiB merges the seven 128 MiB memslots under the guest
into one of 1 GiB, unplugging a block of it splits that again. Each such
change deletes memslots the guest is using, so the vCPU must be kept out of
guest code between the delete and the create (VcpuGate): no pattern may be
lost or read wrong, and no access may exit as unplugged.

With ``merge-delay=0`` the plug merges on the request path; with a delay
the plug only adds its own memslot and the machine's merge thread
(``MemslotMerger``) merges a moment later, from a thread of its own.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from serial_lines import SerialLines
from vmem_helpers import PLUG, UNPLUG, GiB, MiB, exact_ranges, kvm_ranges, request

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.devices.virtio_mem_proto import ResponseType
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.kvm

GUEST_PLUGGED = 896 * MiB
CYCLES = 60
ROUND = re.compile(r"hammer round=(\d+)")


def wait_until(cond, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.parametrize("merge_delay", [0, 20])
def test_merges_and_splits_under_a_running_guest(guest_elf: Path, merge_delay: int) -> None:
    rounds = threading.Semaphore(0)

    def on_line(line: str) -> None:
        if ROUND.search(line):
            rounds.release()

    serial = SerialLines(on_line)
    lines = serial.lines

    device = VirtioMemProps(id="vmem0", memdev=HostMemory(64 * GiB, "mem0"),
                            requested_size=GUEST_PLUGGED, memslots="exact",
                            merge_delay=merge_delay)
    machine = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest_elf),
                                    maxmem=512 * MiB + 80 * GiB, cmdline="kvmmem.hammer=1",
                                    memory_devices=[device], serial=serial))
    dev = machine.devices["vmem0"]
    bs = dev.block_size
    tail = (GUEST_PLUGGED // bs, (GiB - GUEST_PLUGGED) // bs)     # blocks the guest leaves free
    middle = tail[0] + tail[1] // 2
    shapes: list[int] = []
    errors: list[BaseException] = []
    finished = threading.Event()

    def next_round() -> bool:
        """Wait for the guest's next round line; False if the machine stopped."""
        while not finished.is_set():
            if rounds.acquire(timeout=0.2):
                return True
        return False

    def host() -> None:
        try:
            assert next_round(), f"the guest never started hammering: {lines}"
            with machine.lock:
                dev.set_requested_size(GiB)          # room for the host's plugs
            for cycle in range(CYCLES):
                with machine.lock:
                    assert request(dev, PLUG, *tail).type is ResponseType.ACK      # merge
                    if merge_delay:                     # the eighth 128 MiB, unmerged
                        assert len(kvm_ranges(machine.vm, dev)) == 8 and dev.merges_pending
                if merge_delay:
                    assert wait_until(lambda: not dev.merges_pending), "no deferred merge"
                with machine.lock:
                    shapes.append(len(kvm_ranges(machine.vm, dev)))
                    assert kvm_ranges(machine.vm, dev) == exact_ranges(dev)
                    assert request(dev, UNPLUG, middle, 1).type is ResponseType.ACK  # split
                    shapes.append(len(kvm_ranges(machine.vm, dev)))
                    assert kvm_ranges(machine.vm, dev) == exact_ranges(dev)
                    assert request(dev, UNPLUG, tail[0], middle - tail[0]).type is ResponseType.ACK
                    assert request(dev, UNPLUG, middle + 1,
                                   sum(tail) - middle - 1).type is ResponseType.ACK
                if cycle % 10 == 9:                  # the guest ran between the changes
                    assert next_round(), f"the guest stopped hammering: {lines[-3:]}"
        except BaseException as exc:            # reported by the main thread
            errors.append(exc)
        finally:
            machine.shutdown(0)

    thread = threading.Thread(target=host)
    thread.start()
    try:
        status = machine.run()
    finally:
        finished.set()
        thread.join(60)
        machine.close()
    assert not errors, errors
    assert status == 0
    assert not [line for line in lines if "mismatch" in line or "error" in line
                or "exception" in line], lines
    assert machine.unplugged.count == 0 and not machine.unplugged_accesses
    # one 1 GiB memslot; split around block 480: 7 x 128M + 4 x 16M | 7 x 2M + 3 x 16M
    assert shapes[:2] == [1, 21]
    # every merge and every split stopped the vCPU (the unplugs of the rest delete no
    # memslot over plugged blocks but the one left of the hole)
    assert machine.gate.quiesces >= 2 * CYCLES
    assert machine.merger.merges == (CYCLES if merge_delay else 0)
    assert int(ROUND.findall("\n".join(lines))[-1]) >= 64 * (CYCLES // 10)
