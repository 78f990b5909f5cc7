"""vCPU and VM state saved and restored through KVM (kvmmem.kvm.state): the
test guest, stopped mid-run, continues in a new VM (issue 21, its KVM part).

Real KVM and real guest code: the guest plugs 256 MiB and writes and reads
every plugged block forever (``kvmmem.hammer=1``), numbering its rounds. The
first machine is paused; its registers, FPU, MSRs, LAPIC, events, PICs,
IOAPIC, PIT and clock are saved, with boot RAM and the plugged blocks; a
second machine gets the same blocks plugged and all of that loaded, and
its guest must go on where the first stopped: the next round numbers, every
value it reads back as it wrote it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
from serial_lines import SerialLines
from vmem_helpers import PLUG, GiB, MiB, request
from waiting import wait_until

from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.devices.virtio_mem_proto import ResponseType
from kvmmem.kvm.state import readable_msrs, restore_vcpu, restore_vm, save_vcpu, save_vm
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.kvm

PLUGGED = 256 * MiB
RAM = 256 * MiB
ROUND = re.compile(r"hammer round=(\d+)")


class Run:
    """A machine with the hammering guest, run in a thread; its round numbers."""

    def __init__(self, guest_elf: Path, mode: str) -> None:
        self.rounds: list[int] = []
        self.serial = SerialLines(self._line)
        self.memdev = HostMemory(16 * GiB, "mem0")
        device = VirtioMemProps(id="vmem0", memdev=self.memdev, requested_size=PLUGGED,
                                memslots=mode, merge_delay=0)
        self.machine = Machine(MachineConfig(ram_size=RAM, kernel=str(guest_elf),
                                             maxmem=RAM + 32 * GiB, cmdline="kvmmem.hammer=1",
                                             memory_devices=[device], serial=self.serial))
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(self.machine.run()))

    def _line(self, line: str) -> None:
        m = ROUND.search(line)
        if m:
            self.rounds.append(int(m[1]))

    def goes_on_after(self, last: int) -> None:
        """This (restored) guest prints the next rounds of the run whose last
        printed round was ``last`` (a line every 64), not those of a new boot
        (which would count from 64 again); a line the stop cut in two is lost."""
        wait_until(lambda: len(self.rounds) >= 2, "the restored guest did not go on")
        assert self.rounds[0] in (last + 64, last + 128), (last, self.rounds[:3])
        assert self.rounds[1] == self.rounds[0] + 64

    def finish(self) -> None:
        self.machine.shutdown(0)
        self.thread.join(30)
        self.machine.close()
        self.memdev.close()


@pytest.mark.parametrize("mode", ["dynamic", "exact"])
def test_a_stopped_guest_continues_in_a_new_vm(guest_elf: Path, mode: str) -> None:
    source = Run(guest_elf, mode)
    source.thread.start()
    target: Run | None = None
    try:
        wait_until(lambda: len(source.rounds) >= 1, "the guest did not hammer")
        m = source.machine
        m.pause()
        indices = readable_msrs(m.vcpu, m.kvm.get_msr_index_list())
        vcpu_state, vm_state = save_vcpu(m.vcpu, indices), save_vm(m.vm)
        # a second save of the stopped vCPU gives the same bytes
        again = save_vcpu(m.vcpu, indices)
        assert (again.regs, again.sregs, again.xsave, again.xcrs, again.debugregs) == \
            (vcpu_state.regs, vcpu_state.sregs, vcpu_state.xsave, vcpu_state.xcrs,
             vcpu_state.debugregs)
        last = source.rounds[-1]
        dev = m.devices["vmem0"]
        runs = list(dev.bitmap.plugged_runs())              # type: ignore[union-attr]
        assert sum(n for _, n in runs) * dev.block_size == PLUGGED
        ram = m.memory.ram_host.read(0, RAM)
        blocks = [(f, n, source.memdev.read(f * dev.block_size, n * dev.block_size))
                  for f, n in runs]

        target = Run(guest_elf, mode)
        t = target.machine
        tdev = t.devices["vmem0"]
        for first, n, _ in blocks:                          # the same plug state
            assert request(tdev, PLUG, first, n).type is ResponseType.ACK
        t.memory.ram_host.write(0, ram)
        for first, _, data in blocks:
            target.memdev.write(first * tdev.block_size, data)
        restore_vm(t.vm, vm_state)
        restore_vcpu(t.vcpu, vcpu_state)
        restored = save_vcpu(t.vcpu, indices)
        assert (restored.regs, restored.sregs, restored.xsave, restored.xcrs) == \
            (vcpu_state.regs, vcpu_state.sregs, vcpu_state.xsave, vcpu_state.xcrs)
        target.thread.start()
        target.goes_on_after(last)
    finally:
        source.finish()
        if target is not None:
            target.finish()
    assert not [line for line in source.serial.lines + target.serial.lines
                if "mismatch" in line or "error" in line]
    assert target.machine.unplugged.count == 0
