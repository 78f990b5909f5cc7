"""Where the host time of a 128 MiB plug goes, by memslot mode.

The Linux pattern of :mod:`bench_patterns` (512 PLUG requests of 128 MiB up
to 64 GiB, sent straight to ``VirtioMem.handle``), in a fresh child in its
own memory cgroup as there (KVM's metadata allocations are charged to it,
which makes them dearer), once per mode and run, the runs alternating
between the modes. Each ``Vm.set_user_memory_region`` call (the KVM
binding: a create, or a delete with size 0) is timed and filed by its size;
the rest of a request's time is Python (the device, the memory layer, the
listeners), of which the memory layer's memslot changes are timed apart
(``VirtioMemBacking.remap``, less the binding calls in it). Then the
deferred merge (``memslots=exact``) is timed the same way. This is what
README's "The host time per 128 MiB request" explains.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from kvmmem.devices.memslot_policy import MemslotSpan
from kvmmem.devices.virtio_mem import VirtioMem
from kvmmem.devices.virtio_mem_proto import Request, RequestType
from kvmmem.kvm import Kvm, Vm
from kvmmem.measure import kmem
from kvmmem.measure.bench_patterns import (
    BLOCK,
    GIB,
    MIB,
    TIB,
    pattern_device,
    pattern_machine,
    pattern_requests,
)

MODES = ("dynamic", "exact")


@dataclass
class Calls:
    """Timed binding calls of one kind: how many, and their total seconds."""

    count: int = 0
    seconds: float = 0.0


@dataclass
class Breakdown:
    """One run of the pattern in one mode."""

    mode: str
    requests: int
    request_s: float                       # all requests together
    calls: dict[str, Calls] = field(default_factory=dict)    # "create 128 MiB", "delete"
    merge_s: float = 0.0
    merge_calls: dict[str, Calls] = field(default_factory=dict)
    memory_s: float = 0.0                  # in memslot changes through the memory layer, binding included

    def per_request_us(self, seconds: float) -> float:
        return seconds / self.requests * 1e6

    @property
    def ioctl_s(self) -> float:
        return sum(c.seconds for c in self.calls.values())


def _kind(size: int) -> str:
    if not size:
        return "delete"
    return f"create {size // GIB} GiB" if size >= GIB else f"create {size // MIB} MiB"


def _timing(vm: Vm, into: Callable[[], dict[str, Calls]]) -> None:
    """File every binding call of ``vm`` by kind into the dict ``into()`` gives."""
    call = vm.set_user_memory_region

    def timed(slot: int, gpa: int, size: int, hva: int, flags: int = 0, *,
              host_mapped: bool = False) -> None:
        t0 = time.perf_counter()
        try:
            call(slot, gpa, size, hva, flags, host_mapped=host_mapped)
        finally:
            c = into().setdefault(_kind(size), Calls())
            c.count += 1
            c.seconds += time.perf_counter() - t0

    vm.set_user_memory_region = timed       # type: ignore[method-assign,assignment]


def run_once(mode: str) -> Iterator[Breakdown]:
    """The Linux pattern in a fresh VM (a generator for :func:`kmem.measure`)."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = pattern_machine(vm, TIB)
        dev = pattern_device(machine, mode, "linux", TIB)
        raws = [Request(RequestType.PLUG, dev.addr + offset, size // BLOCK).pack()
                for offset, size in pattern_requests("linux")]
        calls: dict[str, Calls] = {}
        merge_calls: dict[str, Calls] = {}
        sink = [calls]
        _timing(vm, lambda: sink[0])
        memory_s = _timing_memory_layer(dev)
        t0 = time.perf_counter()
        for raw in raws:
            dev.handle(0, raw, 10)
        request_s = time.perf_counter() - t0
        request_memory_s = memory_s[0]
        sink[0] = merge_calls
        t0 = time.perf_counter()
        dev.merge_memslots()
        merge_s = time.perf_counter() - t0
        sink[0] = {}                         # closing the machine is not measured
        yield Breakdown(mode, len(raws), request_s, calls, merge_s, merge_calls,
                        memory_s=request_memory_s)
        machine.close()
        dev.memdev.close()


def _timing_memory_layer(dev: VirtioMem) -> list[float]:
    """Time every memslot change the device makes through the memory layer
    (``VirtioMemBacking.remap``: the alias regions, the transaction, the
    listeners, the KVM binding); the seconds accumulate in the list returned."""
    backing = dev.backing
    assert backing is not None
    remap = backing.remap
    total = [0.0]

    def timed(unmap: Sequence[MemslotSpan], map: Sequence[MemslotSpan]) -> None:
        t0 = time.perf_counter()
        try:
            remap(unmap, map)
        finally:
            total[0] += time.perf_counter() - t0

    backing.remap = timed                  # type: ignore[method-assign]
    return total


def run(modes: Sequence[str] = MODES, runs: int = 5) -> list[Breakdown]:
    backend = kmem.detect()
    out: list[Breakdown] = []
    for _ in range(runs):
        for mode in modes:
            out.append(kmem.measure(run_once, mode, backend=backend).result)
    return out


def summary(results: Sequence[Breakdown]) -> list[str]:
    """Per mode, medians over the runs, per request: total, ioctls, Python;
    then each kind of binding call (count per request, us each)."""
    lines = []
    for mode in dict.fromkeys(r.mode for r in results):
        rs = [r for r in results if r.mode == mode]

        def med(values: list[float]) -> float:
            return statistics.median(values)

        total = med([r.per_request_us(r.request_s) for r in rs])
        ioctl = med([r.per_request_us(r.ioctl_s) for r in rs])
        python = med([r.per_request_us(r.request_s - r.ioctl_s) for r in rs])
        layer = med([r.per_request_us(r.memory_s - r.ioctl_s) for r in rs])
        lines.append(f"{mode}: {total:.0f} us per request = {ioctl:.0f} us in the KVM binding "
                     f"+ {python:.0f} us of Python, {layer:.0f} of them in the memory layer's "
                     f"memslot changes ({len(rs)} runs, medians)")
        for label, which in (("request", "calls"), ("merge", "merge_calls")):
            kinds = sorted({k for r in rs for k in getattr(r, which)})
            for kind in kinds:
                per = [getattr(r, which).get(kind, Calls()) for r in rs]
                each = med([c.seconds / c.count * 1e6 for c in per if c.count])
                count = med([c.count / rs[0].requests for c in per]) if label == "request" \
                    else med([float(c.count) for c in per])
                unit = "per request" if label == "request" else "in the merge"
                lines.append(f"   {label}: {kind}: {count:.3g} {unit}, {each:.0f} us each")
        merge = med([r.merge_s * 1e3 for r in rs])
        if merge >= 0.05:
            lines.append(f"   deferred merge: {merge:.1f} ms")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per mode (default 5)")
    args = parser.parse_args(argv)
    for line in summary(run(runs=args.runs)):
        print(line)
    return 0
