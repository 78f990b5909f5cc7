"""Plug patterns by memslot mode: memslots, KVM metadata and host time per request.

Each case is a fresh child in its own memory cgroup (kvmmem.measure.kmem):
a pc machine with 1 GiB of boot RAM and the device (2 MiB blocks), the
pattern's requests sent straight to the device (``VirtioMem.handle``), each
timed, then the cgroup's kernel charge read; the metadata is that minus the
same machine without the device. The patterns:

- ``contiguous``: 1 GiB in 8 requests of 128 MiB from the device's start;
- ``scattered``: 1 GiB as 512 requests of one block, one block in each of
  512 GiBs (what a guest leaves after shrinking around pinned blocks);
- ``linux``: 64 GiB in 512 requests of 128 MiB upward, as Linux's driver
  plugs its memory blocks; then one 2 MiB block in the middle of the run
  is unplugged, its memslots and time reported.

The *floor* of a pattern is the same plugged memory as the fewest memslots
that cover exactly the plugged blocks (one 1 GiB memslot, 512 of 2 MiB, one
of 64 GiB), made with bare ``KVM_SET_USER_MEMORY_REGION`` calls.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response, ResponseType
from kvmmem.kvm import Kvm, Vm
from kvmmem.measure import kmem
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine_memory import MachineMemory

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
BLOCK = 2 * MIB
BOOT_RAM = GIB
STEP = 128 * MIB
PATTERNS = ("contiguous", "scattered", "linux")
PATTERN_MODES = ("dynamic", "exact")


def pattern_requests(pattern: str) -> list[tuple[int, int]]:
    """``(offset, size)`` in bytes of each PLUG request of a pattern, in order."""
    if pattern == "contiguous":
        return [(i * STEP, STEP) for i in range(GIB // STEP)]
    if pattern == "scattered":
        return [(i * GIB, BLOCK) for i in range(GIB // BLOCK)]
    if pattern == "linux":
        return [(i * STEP, STEP) for i in range(64 * GIB // STEP)]
    raise ValueError(f"unknown pattern {pattern!r}: one of {', '.join(PATTERNS)}")


def floor_memslots(pattern: str) -> list[tuple[int, int]]:
    """``(offset, size)`` of the fewest memslots over exactly the pattern's blocks."""
    if pattern == "contiguous":
        return [(0, GIB)]
    if pattern == "linux":
        return [(0, 64 * GIB)]
    return pattern_requests(pattern)


@dataclass
class PatternCase:
    pattern: str
    mode: str                               # a memslot mode, or "floor"
    requests: int = 0
    memslots: int | None = None
    kernel_bytes: int | None = None         # minus the machine without the device
    request_us: list[float] | None = None   # mean host time per request, one per run
    hole_memslots: int | None = None        # linux: after unplugging the middle block
    hole_ms: list[float] | None = None
    merge_ms: list[float] | None = None     # the deferred merges after the last request
    memslots_before_merge: int | None = None
    kernel_bytes_before_merge: int | None = None
    error: str | None = None

    @property
    def request_us_median(self) -> float | None:
        return statistics.median(self.request_us) if self.request_us else None

    @property
    def merge_ms_median(self) -> float | None:
        return statistics.median(self.merge_ms) if self.merge_ms else None

    @property
    def total_us_median(self) -> float | None:
        """Host time per request with the deferred merges shared among the requests."""
        if not self.request_us or not self.merge_ms or not self.requests:
            return None
        return statistics.median(r + m * 1e3 / self.requests
                                 for r, m in zip(self.request_us, self.merge_ms))

    @property
    def hole_ms_median(self) -> float | None:
        return statistics.median(self.hole_ms) if self.hole_ms else None


def _send(dev: VirtioMem, kind: RequestType, offset: int, size: int) -> float:
    """One request; its host time in seconds."""
    raw = Request(kind, dev.addr + offset, size // dev.block_size).pack()
    t0 = time.perf_counter()
    answer = dev.handle(0, raw, 10)
    elapsed = time.perf_counter() - t0
    resp = Response.parse(answer) if answer is not None else None
    if resp is None or resp.type is not ResponseType.ACK:
        raise RuntimeError(f"{kind.name} of {size:#x} bytes at {offset:#x} answered {resp}")
    return elapsed


def _own_kernel_bytes(backend: kmem.KmemBackend) -> int:
    return kmem.MemCgroup(backend.cgroup_dir_of(), backend).kernel_bytes()


def pattern_machine(vm: Vm, device_size: int) -> MachineMemory:
    """The machine every pattern case runs on (the baseline, the floor, the devices)."""
    return MachineMemory(vm, BOOT_RAM, maxmem=device_size + 2 * GIB)


def pattern_device(machine: MachineMemory, mode: str, pattern: str,
                   device_size: int) -> VirtioMem:
    """A fresh device plugged into ``machine``, its requested-size spanning
    every request of ``pattern`` so that the usable region reaches them all."""
    span = max(offset + size for offset, size in pattern_requests(pattern))
    dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"),
                                   block_size=BLOCK, memslots=MemslotMode(mode),
                                   requested_size=span))
    machine.plug(dev)
    return dev


def device_pattern(backend: kmem.KmemBackend, mode: str, pattern: str,
                   device_size: int) -> Iterator[dict[str, Any]]:
    """The pattern's requests into a fresh device; the charge; the linux hole."""
    requests = pattern_requests(pattern)
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = pattern_machine(vm, device_size)
        dev = pattern_device(machine, mode, pattern, device_size)
        times = [_send(dev, RequestType.PLUG, offset, size) for offset, size in requests]
        before_merge, kernel_before_merge = dev.nb_memslots, _own_kernel_bytes(backend)
        # what the VMM does once the guest stopped plugging for merge-delay ms
        t0 = time.perf_counter()
        dev.merge_memslots()
        merge_s = time.perf_counter() - t0
        out: dict[str, Any] = {"kernel_raw": _own_kernel_bytes(backend), "memslots": dev.nb_memslots,
                               "request_s": statistics.fmean(times), "requests": len(times),
                               "merge_s": merge_s, "memslots_before_merge": before_merge,
                               "kernel_raw_before_merge": kernel_before_merge}
        if pattern == "linux":
            middle = 32 * GIB + 16 * MIB          # a block inside a 128 MiB step, mid-run
            out["hole_s"] = _send(dev, RequestType.UNPLUG, middle, BLOCK)
            out["hole_memslots"] = dev.nb_memslots
        yield out
        machine.close()
        dev.memdev.close()


def floor_pattern(backend: kmem.KmemBackend, pattern: str, device_size: int) -> Iterator[dict[str, Any]]:
    """The floor: the machine and the fewest exact memslots as bare memslots."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = pattern_machine(vm, device_size)
        host = HostMemory(device_size, "floor")
        base = machine.layout.device_memory.start if machine.layout.device_memory else 1 << 40
        slots = floor_memslots(pattern)
        for offset, size in slots:
            vm.add_memslot(base + offset, size, host.address + offset)
        yield {"kernel_raw": _own_kernel_bytes(backend), "memslots": len(slots), "requests": 0}
        machine.close()
        host.close()


def baseline_vm(device_size: int) -> Iterator[None]:
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = pattern_machine(vm, device_size)
        yield None
        machine.close()


def run_patterns(device_size: int = TIB, modes: tuple[str, ...] = PATTERN_MODES,
                 patterns: tuple[str, ...] = PATTERNS, runs: int = 7,
                 progress: Any = None) -> list[PatternCase]:
    """Every pattern in every mode (``runs`` times, for the time) and its floor."""
    backend = kmem.detect()
    baseline = statistics.median(kmem.measure(baseline_vm, device_size, backend=backend).kernel_bytes
                                 for _ in range(3))
    cases: list[PatternCase] = []
    for pattern in patterns:
        group = {mode: PatternCase(pattern, mode, request_us=[], hole_ms=[], merge_ms=[])
                 for mode in (*modes, "floor")}
        # runs alternate between the modes, so that a slower spell of the host
        # does not fall on one mode only
        for run in range(runs):
            for mode, case in group.items():
                if case.error or (mode == "floor" and run):
                    continue
                if progress is not None:
                    progress(f"{pattern} {mode} run {run + 1}")
                try:
                    _measure_case(case, backend, baseline, device_size, first=run == 0)
                except kmem.KmemError as exc:
                    case.error = str(exc).splitlines()[0]
        cases.extend(group.values())
    return cases


def _measure_case(case: PatternCase, backend: kmem.KmemBackend, baseline: float,
                  device_size: int, first: bool) -> None:
    if case.mode == "floor":
        m = kmem.measure(floor_pattern, backend, case.pattern, device_size, backend=backend)
    else:
        m = kmem.measure(device_pattern, backend, case.mode, case.pattern, device_size,
                         backend=backend)
    r = m.result
    if first:
        case.kernel_bytes = int(r["kernel_raw"] - m.baseline_bytes - baseline)
        case.memslots, case.requests = r["memslots"], r["requests"]
        case.memslots_before_merge = r.get("memslots_before_merge")
        if "kernel_raw_before_merge" in r:
            case.kernel_bytes_before_merge = int(r["kernel_raw_before_merge"] - m.baseline_bytes
                                                 - baseline)
    if "request_s" in r:
        case.request_us.append(r["request_s"] * 1e6)          # type: ignore[union-attr]
        case.merge_ms.append(r["merge_s"] * 1e3)              # type: ignore[union-attr]
    if "hole_s" in r:
        case.hole_ms.append(r["hole_s"] * 1e3)                # type: ignore[union-attr]
        case.hole_memslots = r["hole_memslots"]


def _find(cases: list[PatternCase], pattern: str, mode: str) -> PatternCase | None:
    return next((c for c in cases if c.pattern == pattern and c.mode == mode
                 and c.kernel_bytes is not None), None)


def format_patterns(cases: list[PatternCase], device_size: int) -> str:
    """The Markdown table of the patterns and the targets of memslots=exact."""
    rows = [f"### Plug patterns, {device_size // GIB} GiB device, 2 MiB blocks",
            "",
            "| pattern | mode | requests | memslots (before the deferred merge) "
            "| kernel metadata MiB (before the merge) | / floor | host us per request (median of runs) "
            "| deferred merge ms | us per request with the merge "
            "| unplug the middle block: memslots, ms |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if c.error:
            rows.append(f"| {c.pattern} | {c.mode} | failed: {c.error} | | | | | | | |")
            continue
        floor = _find(cases, c.pattern, "floor")
        ratio = (f"{c.kernel_bytes / floor.kernel_bytes:.2f}x"
                 if floor and floor.kernel_bytes and c.kernel_bytes is not None else "-")
        us = c.request_us_median
        runs = "" if not c.request_us else " (" + ", ".join(f"{u:.0f}" for u in c.request_us) + ")"
        hole = (f"{c.hole_memslots}, {c.hole_ms_median:.1f} ms" if c.hole_ms_median is not None else "")
        slots, mib = str(c.memslots), f"{(c.kernel_bytes or 0) / MIB:.1f}"
        if c.memslots_before_merge not in (None, c.memslots):
            slots += f" ({c.memslots_before_merge})"
            if c.kernel_bytes_before_merge is not None:
                mib += f" ({c.kernel_bytes_before_merge / MIB:.1f})"
        merge, total = c.merge_ms_median, c.total_us_median
        rows.append(f"| {c.pattern} | {c.mode} | {c.requests} | {slots} | {mib} | {ratio} | "
                    f"{'-' if us is None else f'{us:.0f}'}{runs} | "
                    f"{'-' if merge is None else f'{merge:.1f}'} | "
                    f"{'-' if total is None else f'{total:.0f}'} | {hole} |")
    rows += ["", "| target | measured | met |", "|---|---|---|"]
    for target, measured, met in pattern_targets(cases):
        rows.append(f"| {target} | {measured} | {'yes' if met else 'NO'} |")
    return "\n".join(rows) + "\n"


def pattern_targets(cases: list[PatternCase]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the targets of memslots=exact (issue 14)."""
    out: list[tuple[str, str, bool]] = []

    def kb(pattern: str, mode: str) -> int | None:
        c = _find(cases, pattern, mode)
        return None if c is None else c.kernel_bytes

    floor, exact = kb("scattered", "floor"), kb("scattered", "exact")
    if floor and exact is not None:
        out.append(("scattered 1 GiB: exact <= 1.25x the floor",
                    f"{exact / MIB:.1f} MiB vs {floor / MIB:.1f} MiB = {exact / floor:.2f}x",
                    exact <= 1.25 * floor))
    for pattern in ("contiguous", "linux"):
        d, e = kb(pattern, "dynamic"), kb(pattern, "exact")
        if d is not None and e is not None:
            out.append((f"{pattern}: exact's metadata <= dynamic's",
                        f"{e / MIB:.2f} MiB vs {d / MIB:.2f} MiB", e <= d))
    lin = _find(cases, "linux", "exact")
    if lin is not None and lin.memslots is not None:
        out.append(("64 GiB in 128 MiB steps: <= 8 memslots", str(lin.memslots), lin.memslots <= 8))
    dyn = _find(cases, "linux", "dynamic")
    if lin and dyn and lin.request_us_median and dyn.request_us_median:
        # runs alternate between the modes: compare run k of one with run k of
        # the other, so that a slow spell of the host weighs on both
        pairs = [e / d for e, d in zip(lin.request_us or [], dyn.request_us or []) if d]
        ratio = statistics.median(pairs) if pairs else lin.request_us_median / dyn.request_us_median
        spread = f", runs {min(pairs):.2f}-{max(pairs):.2f}x" if len(pairs) > 1 else ""
        out.append(("host time per 128 MiB request: exact <= 2x dynamic",
                    f"{lin.request_us_median:.0f} us vs {dyn.request_us_median:.0f} us; "
                    f"median of per-run ratios {ratio:.2f}x{spread}", ratio <= 2))
        if lin.total_us_median and dyn.total_us_median:
            total = lin.total_us_median / dyn.total_us_median
            out.append(("(for the record) with the deferred merges: exact / dynamic",
                        f"{lin.total_us_median:.0f} us vs {dyn.total_us_median:.0f} us = "
                        f"{total:.2f}x", True))
    return out
