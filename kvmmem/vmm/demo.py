"""``kvmmem demo``: the seed replayed on this machine.

A pc machine with 4 GiB of RAM and a 500 GiB virtio-mem device is asked for
2 GiB, 20 GiB, then 5 GiB followed by a reboot. After each step the demo
prints the ``device-memory`` part of ``info mtree`` (in ``usable`` mode the
seed's listings), the memslots the device holds, the plugged size, and the
kernel memory KVM's metadata costs, measured in a memory cgroup, next to
what the same device costs as one memslot (``single``). The driver is the
host-side :class:`~kvmmem.devices.virtio_mem_driver.HostDriver`, which sends
the requests Linux's driver sends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack

from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_driver import HostDriver
from kvmmem.kvm import Kvm
from kvmmem.memory import HostMemory
from kvmmem.vmm.kmem import KmemError, KmemProbe
from kvmmem.vmm.machine_memory import MachineMemory
from kvmmem.vmm.units import format_size, mib

GiB = 1 << 30
Say = Callable[[str], None]


class _Meter:
    """Kernel memory charged to this process, or why it cannot be read."""

    def __init__(self, stack: ExitStack) -> None:
        try:
            self.probe: KmemProbe | None = stack.enter_context(KmemProbe())
            self.why = ""
        except (KmemError, OSError) as exc:
            self.probe, self.why = None, str(exc)

    def read(self) -> int | None:
        return self.probe.kernel_bytes() if self.probe else None


def _fmt(value: int | None) -> str:
    return mib(value) if value is not None else "n/a"


def device_memory_listing(machine: MachineMemory) -> list[str]:
    """The ``device-memory`` line of ``info mtree`` and everything below it."""
    lines = machine.info_mtree().splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("): device-memory"))
    indent = len(lines[start]) - len(lines[start].lstrip())
    block = [lines[start]]
    for line in lines[start + 1:]:
        if len(line) - len(line.lstrip()) <= indent:
            break
        block.append(line)
    return block


def _machine(kvm: Kvm, mode: str, size: int, ram: int, maxmem: int):  # type: ignore[no-untyped-def]
    vm = kvm.create_vm()
    machine = MachineMemory(vm, ram, maxmem=maxmem, slots=13)
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(size, "mem0"), memslots=mode))
    return vm, machine, dev


def run_demo(modes: Sequence[str] = ("usable", "dynamic"), size: int = 500 * GiB,
             requested: Sequence[int] = (2 * GiB, 20 * GiB, 5 * GiB), reboot_last: bool = True,
             ram: int = 4 * GiB, maxmem: int = 1028 * GiB, say: Say = print) -> None:
    """Replay the seed in each mode and print what happened."""
    with ExitStack() as stack, Kvm() as kvm:
        meter = _Meter(stack)
        if meter.probe is None:
            say(f"(kernel memory cannot be measured here: {meter.why})")
        vm, machine, dev = _machine(kvm, "single", size, ram, maxmem)
        before = meter.read()
        t0 = time.perf_counter()
        machine.plug(dev)
        single_seconds = time.perf_counter() - t0
        single = None if before is None else meter.read() - before  # type: ignore[operator]
        machine.close(), vm.close(), dev.memdev.close()
        say(f"baseline, memslots=single: the {format_size(size)} device is one memslot: "
            f"{_fmt(single)} of KVM metadata, created in {single_seconds:.2f} s")

        for mode in modes:
            vm, machine, dev = _machine(kvm, mode, size, ram, maxmem)
            before = meter.read()
            machine.plug(dev)
            driver = HostDriver(dev)
            say("")
            say(f"== memslots={mode}: {format_size(size)} virtio-mem on a {format_size(ram)} pc "
                f"machine, {dev.memslot_size // GiB} GiB memslots ==")
            steps = [(0, False)] + [(r, reboot_last and i == len(requested) - 1)
                                    for i, r in enumerate(requested)]
            for value, reboot in steps:
                dev.set_requested_size(value)
                _progress(f"driver: plugging towards {format_size(value)}")
                driver.sync()
                if reboot:
                    machine.system_reset()
                    driver.reboot()
                    driver.sync()
                _progress("")
                label = f"requested-size {format_size(value)}" + (", then reboot" if reboot else "")
                cost = None if before is None else meter.read() - before  # type: ignore[operator]
                say(f"-- {label}")
                for line in device_memory_listing(machine):
                    say(line)
                say(f"   memslots: {len(dev.mapped_memslots)} of the device, {vm.used_memslots} "
                    f"in KVM | plugged {format_size(dev.plugged_size)} | KVM metadata of the "
                    f"device {_fmt(cost)} (single: {_fmt(single)})")
            machine.close(), vm.close(), dev.memdev.close()


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
