"""A reset loads the kernel read at start, whatever happened to its file.

The machine reads ``-kernel`` once; a reset (from the guest, from another
thread while the guest runs, or while it is paused) copies that image back
to guest memory, as QEMU's rom blobs are. The file may be deleted, renamed,
replaced by another kernel or made unopenable after start: the same guest
boots again, and a reset either completes or changes nothing.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
from pathlib import Path

import pytest
from tiny_guest import elf, exit_with

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.kvm

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 30


def _change(kernel: Path, how: str) -> None:
    if how == "deleted":
        kernel.unlink()
    elif how == "renamed":
        kernel.rename(kernel.with_suffix(".old"))
    elif how == "replaced":             # another valid kernel: it would exit at once with 5
        replacement = kernel.with_suffix(".new")
        replacement.write_bytes(elf(exit_with(2)))
        os.replace(replacement, kernel)
    elif how == "garbage":
        kernel.write_bytes(b"not a kernel")
    elif how == "unopenable":
        kernel.unlink()
        kernel.mkdir()                  # open() fails (EISDIR), even for root
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["deleted", "renamed", "replaced", "garbage", "unopenable"])
def test_resets_boot_the_kernel_read_at_start(guest_elf, tmp_path, how: str) -> None:  # type: ignore[no-untyped-def]
    kernel = tmp_path / "guest.elf"
    shutil.copy(guest_elf, kernel)
    lines: queue.Queue[str] = queue.Queue()
    partial = bytearray()

    def serial(data: bytes) -> None:
        partial.extend(data)
        while b"\n" in partial:
            line, _, rest = bytes(partial).partition(b"\n")
            partial[:] = rest
            lines.put(line.decode(errors="replace"))

    device = VirtioMemProps(id="vmem0", memdev=HostMemory(4 * GiB, "mem0"),
                            requested_size=128 * MiB, memslots="dynamic")
    machine = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(kernel),
                                    maxmem=512 * MiB + 8 * GiB, memory_devices=[device],
                                    serial=serial))
    dev = machine.devices["vmem0"]
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(machine.run()))

    def next_boot() -> list[str]:
        """The lines of one boot of the test guest, up to its first wait."""
        seen: list[str] = []
        while not seen or seen[-1] != "waiting for a config change":
            try:
                seen.append(lines.get(timeout=TIMEOUT))
            except queue.Empty:
                raise AssertionError(f"the guest stopped (status {status}) after {seen}") from None
        assert seen[0].startswith("kvmmem-guest: cmdline"), seen
        return seen

    thread.start()
    try:
        assert dev.plugged_size == 0 and next_boot() and dev.plugged_size == 128 * MiB
        _change(kernel, how)

        machine.request_reset()                   # running: done by the vCPU thread
        assert next_boot() and machine.resets == 1 and dev.plugged_size == 128 * MiB

        machine.pause()
        with machine.lock:
            dev.set_requested_size(256 * MiB)
        machine.request_reset()                   # paused: done at once, here
        assert machine.resets == 2 and machine.paused
        assert dev.plugged_size == 0 and dev.requested_size == 256 * MiB
        machine.resume()
        assert next_boot() and dev.plugged_size == 256 * MiB
        assert thread.is_alive() and not status
        machine.shutdown(7)
        thread.join(TIMEOUT)
        assert status == [7]
    finally:
        if thread.is_alive():
            machine.shutdown(1)
            thread.join(TIMEOUT)
        machine.close()
