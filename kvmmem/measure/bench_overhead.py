"""What kvmmem costs per memslot change, against the bare ioctl.

One VM with a ``dynamic`` virtio-mem device of ``others + 2`` memslots of
1 GiB, of which ``others`` (from memslot 2 on) are mapped by plugging one
block in each: the change is measured among that many memslots, as in a
large device in use. Four ways of creating and deleting the 1 GiB memslot 1
are timed, in rounds: each round runs ``batch`` create+delete pairs of each
way in turn (steady state, as a VMM making many changes sees it). A way's
ratio is the median over the rounds of its time against the bare ioctl's
in the same round, so that the drift of the ioctl's own cost over a run
(it moves by a third on these machines) cancels out:

- device: a PLUG request of one block at the start of memslot 1 (maps it)
  and the UNPLUG of that block (unmaps it), through ``VirtioMem.handle``;
- memory: adding and removing an unmergeable alias of the same range in
  the device's memslot container (transaction, flat view, KVM listener);
- vm: ``Vm.add_memslot`` / ``Vm.delete_memslot``;
- ioctl: ``fcntl.ioctl(KVM_SET_USER_MEMORY_REGION)`` create + delete, the
  bare ioctl the others are compared with.

Run alone it prints a Markdown table; bench_slots.py includes it in its run.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response, ResponseType
from kvmmem.kvm import Kvm
from kvmmem.measure.bare_ioctl import SET_USER_MEMORY_REGION, memory_region
from kvmmem.memory import HostMemory, MemoryRegion
from kvmmem.vmm.machine_memory import MachineMemory

GIB = 1 << 30
BOOT_RAM = GIB
TARGET = 1.2                    # the project's goal: per memslot change <= 1.2x the bare ioctl


@dataclass
class Overhead:
    """One memslot change through kvmmem against the bare ioctl, among ``others`` memslots."""

    device_change_s: float       # plug or unplug of a block that maps/unmaps a memslot
    vm_change_s: float           # Vm.add_memslot / Vm.delete_memslot
    ioctl_change_s: float        # fcntl.ioctl KVM_SET_USER_MEMORY_REGION
    rounds: int
    batch: int                   # changes per timed sample
    memory_change_s: float | None = None   # memory transaction mapping/unmapping one alias
    others: int = 0                        # memslots of the device mapped meanwhile
    # Median per-round ratios to the bare ioctl; None: the ratio of the medians.
    paired: dict[str, float] | None = None

    def _ratio(self, way: str, t: float | None) -> float | None:
        if self.paired and way in self.paired:
            return self.paired[way]
        return None if t is None else t / self.ioctl_change_s

    @property
    def memory_ratio(self) -> float | None:
        return self._ratio("memory", self.memory_change_s)

    @property
    def device_ratio(self) -> float:
        return self._ratio("device", self.device_change_s)  # type: ignore[return-value]

    @property
    def vm_ratio(self) -> float:
        return self._ratio("vm", self.vm_change_s)  # type: ignore[return-value]


def measure_overhead(rounds: int = 31, others: int = 0, batch: int = 20) -> Overhead:
    """Median time per memslot change of each way (see the module docstring)."""
    device_size = (others + 2) * GIB
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = MachineMemory(vm, BOOT_RAM, maxmem=device_size + 4 * GIB)
        dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"),
                                       requested_size=device_size, memslots=MemslotMode.DYNAMIC))
        try:
            machine.plug(dev)
            return _measure(vm, dev, rounds, others, batch)
        finally:
            machine.close()
            dev.memdev.close()


def _measure(vm, dev: VirtioMem, rounds: int, others: int, batch: int) -> Overhead:  # type: ignore[no-untyped-def]
    size = dev.memslot_size
    if size != GIB:
        raise RuntimeError(f"expected 1 GiB memslots, the device got {size:#x}")
    for index in range(2, others + 2):
        _ack(dev, Request(RequestType.PLUG, dev.addr + index * size, 1).pack())
    gpa, uaddr = dev.addr + size, dev.memdev.address + size
    plug = Request(RequestType.PLUG, gpa, 1).pack()
    unplug = Request(RequestType.UNPLUG, gpa, 1).pack()
    slot = max(vm.memslots, default=-1) + 100
    create = memory_region(slot, gpa, size, uaddr)
    delete = memory_region(slot, gpa, 0, uaddr)
    container = dev.backing.top                          # type: ignore[union-attr]
    alias = MemoryRegion.alias("bench-memslot", dev.backing.ram, size, size,  # type: ignore[union-attr]
                               unmergeable=True)
    fd, request = vm.fd, SET_USER_MEMORY_REGION

    def via_device() -> None:
        for _ in range(batch):
            dev.handle(0, plug, 10)
            dev.handle(0, unplug, 10)

    def via_memory() -> None:
        for _ in range(batch):
            container.add_subregion(size, alias)
            container.del_subregion(alias)

    def via_vm() -> None:
        for _ in range(batch):
            vm.delete_memslot(vm.add_memslot(gpa, size, uaddr))

    def via_ioctl() -> None:
        for _ in range(batch):
            fcntl.ioctl(fd, request, create)
            fcntl.ioctl(fd, request, delete)

    before = vm.used_memslots
    _ack(dev, plug)
    if vm.used_memslots != before + 1:
        raise RuntimeError("the PLUG request did not map exactly one memslot")
    _ack(dev, unplug)
    ways: dict[str, Callable[[], None]] = {"device": via_device, "memory": via_memory,
                                           "vm": via_vm, "ioctl": via_ioctl}
    samples: dict[str, list[float]] = {k: [] for k in ways}
    clock = time.perf_counter
    for fn in ways.values():                              # warm up
        fn()
    for _ in range(rounds):
        for name, fn in ways.items():
            t0 = clock()
            fn()
            samples[name].append((clock() - t0) / (2 * batch))
    if vm.used_memslots != before or dev.plugged_size != others * dev.block_size:
        raise RuntimeError("the measured changes did not leave the memslots as they were")
    med = {k: statistics.median(v) for k, v in samples.items()}
    paired = {k: statistics.median(t / i for t, i in zip(samples[k], samples["ioctl"]))
              for k in ("device", "memory", "vm")}
    return Overhead(med["device"], med["vm"], med["ioctl"], rounds, 2 * batch, med["memory"],
                    others, paired)


def _ack(dev: VirtioMem, request: bytes) -> None:
    raw = dev.handle(0, request, 10)
    resp = Response.parse(raw) if raw is not None else None
    if resp is None or resp.type is not ResponseType.ACK:
        raise RuntimeError(f"{Request.parse(request)} answered {resp}")


def format_overheads(overheads: list[Overhead]) -> str:
    """The Markdown table: one row per way, one column pair per number of memslots."""
    head = "| one memslot change (1 GiB slot) |" + "".join(
        f" among {o.others} memslots: median us | / bare ioctl |" for o in overheads)
    rows = [head, "|---|" + "---|---|" * len(overheads)]
    lines: list[tuple[str, Callable[[Overhead], tuple[float | None, float | None]]]] = [
        ("virtio-mem request (plug/unplug one block, maps/unmaps the slot)",
         lambda o: (o.device_change_s, o.device_ratio)),
        ("memory transaction (map/unmap one unmergeable alias)",
         lambda o: (o.memory_change_s, o.memory_ratio)),
        ("Vm.add_memslot / Vm.delete_memslot", lambda o: (o.vm_change_s, o.vm_ratio)),
        ("fcntl.ioctl(KVM_SET_USER_MEMORY_REGION)", lambda o: (o.ioctl_change_s, 1.0)),
    ]
    for label, get in lines:
        cells = []
        for o in overheads:
            t, r = get(o)
            cells.append("- | - |" if t is None or r is None else f" {t * 1e6:.1f} | {r:.2f} |")
        rows.append(f"| {label} |" + "".join(cells))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memslots", default="0,1000",
                        help="numbers of other mapped memslots, comma-separated (default 0,1000)")
    parser.add_argument("--rounds", type=int, default=31, help="timed rounds per way (default 31)")
    parser.add_argument("--batch", type=int, default=20,
                        help="create+delete pairs per round and way (default 20)")
    args = parser.parse_args(argv)
    overheads = [measure_overhead(args.rounds, int(n), args.batch) for n in args.memslots.split(",")]
    print(format_overheads(overheads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
