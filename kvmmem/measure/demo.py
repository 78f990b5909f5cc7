"""``kvmmem demo``: the example of QEMU's RFC "virtio-mem: Expose device memory
via separate memslots" (2021) replayed on this machine.

A pc machine with 4 GiB of RAM and a 500 GiB virtio-mem device is asked for
2 GiB, 20 GiB, then 5 GiB followed by a reboot. After each step the demo
prints the ``device-memory`` part of ``info mtree`` (in ``usable`` mode the
RFC's listings, kept in tests/seed.py), the memslots the device holds, the plugged size the guest
reports, and the kernel memory KVM's metadata costs, measured in a memory
cgroup, next to what the same device costs as one memslot (``single``).

The driver is the test guest (``build/guest/guest.elf``) booted under KVM,
which plugs and unplugs through virtio-mmio as Linux's driver does; with
``driver="host"`` requests come from the host-side
:class:`~kvmmem.measure.host_driver.HostDriver` instead (no guest).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.kvm import Kvm
from kvmmem.measure.host_driver import HostDriver
from kvmmem.measure.kmem import KmemError, KmemProbe
from kvmmem.memory import HostMemory
from kvmmem.units import format_size, mib
from kvmmem.vmm.machine import Machine, MachineConfig
from kvmmem.vmm.machine_memory import MachineMemory

GiB = 1 << 30
GUEST_ELF = Path(__file__).resolve().parents[2] / "build" / "guest" / "guest.elf"
STEP_LINE = re.compile(r"plugged=(\d+) requested=(\d+) ok")
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


class GuestDriver:
    """The test guest in a running machine, seen through its UART lines."""

    def __init__(self, kvm: Kvm, props: VirtioMemProps, ram: int, maxmem: int,
                 kernel: Path) -> None:
        if not kernel.exists():
            raise FileNotFoundError(f"test guest {kernel} is missing: run `make` first")
        self._partial = bytearray()
        self._settled = threading.Semaphore(0)
        self.reported = 0
        self.machine = Machine(MachineConfig(ram_size=ram, kernel=str(kernel), maxmem=maxmem,
                                             slots=13, memory_devices=[props],
                                             serial=self._serial), kvm)
        self.dev = self.machine.devices[props.id]
        self._thread = threading.Thread(target=self.machine.run, daemon=True)
        self._thread.start()
        self.wait()

    def _serial(self, data: bytes) -> None:
        self._partial += data
        if data != b"\n":
            return
        line = self._partial.decode(errors="replace").strip()
        self._partial.clear()
        step = STEP_LINE.search(line)
        if step:
            self.reported = int(step[1])
            _progress(f"guest: plugged {format_size(self.reported)} of "
                      f"{format_size(int(step[2]))}")
        elif line == "waiting for a config change":
            self._settled.release()
        elif line.startswith(("error", "pattern mismatch", "busy")):
            raise RuntimeError(f"the guest reports: {line}")

    def wait(self, timeout: float = 300) -> None:
        if not self._settled.acquire(timeout=timeout):
            raise TimeoutError("the guest did not reach requested-size in time")
        # memslots=exact: the machine merges merge-delay ms after the last plug
        deadline = time.monotonic() + timeout
        while self.dev.merges_pending and time.monotonic() < deadline:
            time.sleep(0.01)
        _progress("")

    def resize(self, size: int, reboot: bool) -> None:
        with self.machine.lock:
            self.dev.set_requested_size(size)
        self.wait()
        if reboot:
            self.machine.request_reset()
            self.wait()

    def close(self) -> None:
        self.machine.shutdown(0)
        self._thread.join(30)
        self.machine.close()


class HostSideDriver:
    """The same steps with requests sent from the host (no guest)."""

    def __init__(self, kvm: Kvm, props: VirtioMemProps, ram: int, maxmem: int) -> None:
        self.vm = kvm.create_vm()
        self.memory = MachineMemory(self.vm, ram, maxmem=maxmem, slots=13)
        self.dev = VirtioMem(props)
        self.memory.plug(self.dev)
        self.driver = HostDriver(self.dev)

    @property
    def reported(self) -> int:
        return self.dev.plugged_size

    def resize(self, size: int, reboot: bool) -> None:
        self.dev.set_requested_size(size)
        self.driver.sync()
        if reboot:
            self.memory.system_reset()
            self.driver.reboot()
            self.driver.sync()
        self.dev.merge_memslots()       # what the VMM's merge thread does once plugs stop

    def close(self) -> None:
        self.memory.close()
        self.vm.close()


def run_demo(modes: Sequence[str] = ("usable", "dynamic"), size: int = 500 * GiB,
             requested: Sequence[int] = (2 * GiB, 20 * GiB, 5 * GiB), reboot_last: bool = True,
             ram: int = 4 * GiB, maxmem: int = 1028 * GiB, driver: str = "guest",
             kernel: Path = GUEST_ELF, say: Say = print) -> None:
    """Replay the RFC's example in each mode and print what happened."""
    with ExitStack() as stack, Kvm() as kvm:
        meter = _Meter(stack)
        if meter.probe is None:
            say(f"(kernel memory cannot be measured here: {meter.why})")
        single, seconds = _single_cost(kvm, meter, size, ram, maxmem)
        say(f"baseline, memslots=single: the {format_size(size)} device alone, one memslot, "
            f"costs {_fmt(single)} of KVM metadata (created in {seconds:.2f} s)")
        for mode in modes:
            props = VirtioMemProps(id="vmem0", memdev=HostMemory(size, "mem0"), memslots=MemslotMode(mode))
            before = meter.read()
            session: GuestDriver | HostSideDriver
            if driver == "guest":
                guest = GuestDriver(kvm, props, ram, maxmem, kernel)
                session, memory = guest, guest.machine.memory
                who = "the test guest under KVM"
            else:
                session = HostSideDriver(kvm, props, ram, maxmem)
                memory = session.memory
                who = "the host-side driver"
            dev = session.dev
            say("")
            say(f"== memslots={mode}: {format_size(size)} virtio-mem on a {format_size(ram)} pc "
                f"machine, {_slots(mode, dev.memslot_size)}, driven by {who} ==")
            steps = [(0, False)] + [(r, reboot_last and i == len(requested) - 1)
                                    for i, r in enumerate(requested)]
            empty: int | None = None
            try:
                for value, reboot in steps:
                    if value or reboot:
                        session.resize(value, reboot)
                    cost = None if before is None else meter.read() - before  # type: ignore[operator]
                    empty = cost if empty is None else empty
                    growth = "" if cost is None or cost is empty else \
                        f", +{_fmt(cost - empty)} over nothing plugged"  # type: ignore[operator]
                    say(f"-- requested-size {format_size(value)}" + (", then reboot" if reboot else ""))
                    for line in device_memory_listing(memory):
                        say(line)
                    say(f"   memslots: {dev.nb_memslots} of the device, "
                        f"{memory.vm.used_memslots} in KVM | plugged {format_size(session.reported)} "
                        f"| KVM kernel memory of the VM {_fmt(cost)}{growth}")
            finally:
                session.close()
                props.memdev.close()  # type: ignore[union-attr]


def _slots(mode: str, memslot_size: int) -> str:
    grid = f"{memslot_size // GiB} GiB"
    return f"memslots over the plugged blocks ({grid} grid)" if mode == "exact" else f"{grid} memslots"


def _single_cost(kvm: Kvm, meter: _Meter, size: int, ram: int,
                 maxmem: int) -> tuple[int | None, float]:
    """KVM metadata and creation time of the device as one memslot."""
    with kvm.create_vm() as vm:
        memory = MachineMemory(vm, ram, maxmem=maxmem, slots=13)
        dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(size, "mem0"),
                                       memslots=MemslotMode.SINGLE))
        before = meter.read()
        t0 = time.perf_counter()
        memory.plug(dev)
        seconds = time.perf_counter() - t0
        cost = None if before is None else meter.read() - before  # type: ignore[operator]
        memory.close()
        dev.memdev.close()
    return cost, seconds


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()
