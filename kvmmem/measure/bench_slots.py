"""Memslot metadata, time and memory returned of a virtio-mem device, by memslot mode.

For each memslot mode (``single``, ``usable``, ``dynamic``, ``exact``) and plugged size,
a fresh child in its own memory cgroup (kvmmem.measure.kmem) builds a pc machine
(1 GiB of boot RAM, device memory for the device), plugs the device and
plugs the given size into it, untouched, and reads the kernel charge: that
minus the same machine without the device is the memslot metadata. Then it
grows ``requested_size`` by 1 GiB, plugs that GiB, touches every page of it,
unplugs it again, timing plug and unplug and reading the RSS around them.

A configuration whose memslot metadata the host cannot afford (a 64 TiB
``single`` device needs about 160 GiB) is reported as not possible, with the
estimate, instead of being run. The last part compares one memslot change
through kvmmem (a device request, the memory layer, the Vm binding) with the
bare ``KVM_SET_USER_MEMORY_REGION`` create+delete of the same slot, among 0
and 1000 other memslots (scripts/bench_overhead.py). With --qemu, QEMU's
kernel memory with the same idle device is put beside it
(scripts/bench_qemu.py).

With --patterns, plug patterns (contiguous, scattered one block per GiB,
Linux's 128 MiB steps) are measured in ``dynamic`` and ``exact`` beside
their floor (kvmmem.measure.bench_patterns).

Results go to JSON (--json) and a Markdown table (stdout, --markdown);
scripts/plot_slots.py draws the plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvmmem import units
from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType, Response, ResponseType
from kvmmem.kvm import Kvm
from kvmmem.measure import kmem
from kvmmem.measure.bench_overhead import TARGET as OVERHEAD_TARGET
from kvmmem.measure.bench_overhead import Overhead, format_overheads, measure_overhead
from kvmmem.measure.bench_patterns import PatternCase, format_patterns, run_patterns
from kvmmem.measure.bench_qemu import measure_qemu
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine_memory import MachineMemory

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
PAGE = os.sysconf("SC_PAGE_SIZE")
MODES = ("single", "usable", "dynamic", "exact")
BOOT_RAM = 1 * GIB
CYCLE = 1 * GIB                 # the size plugged and unplugged for the timings
MAX_NB_BLOCKS = 0xFFFF          # a request's nb_blocks is a le16
# One memslot costs 2571 MiB of KVM metadata per TiB on a shadow-MMU host
# (scripts/bench_single_slot.py on the project's machines).
METADATA_PER_GIB = 2.51 * MIB
# A configuration is run only if its estimated metadata fits in this share of MemTotal.
AFFORDABLE_SHARE = 0.5


# ----------------------------------------------------------------- pure helpers

def _bench_spelling(text: str) -> str:
    """``16 GiB`` as QEMU spells it (``16G``): the benchmarks take both."""
    return re.sub(r"([kmgtpe])i?b$", r"\1", re.sub(r"\s+", "", text), flags=re.IGNORECASE)


def parse_size(text: str) -> int:
    """``64``, ``512M``, ``64G``, ``1T`` (a bare number is GiB) to bytes; ``0`` is allowed."""
    try:
        return units.parse_size(_bench_spelling(text), default_unit=GIB)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size: {exc}") from None


def parse_sizes(text: str) -> list[int]:
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError("give at least one size")
    return sorted(set(sizes))


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"modes must be among {', '.join(MODES)}, got {text!r}")
    return [m for m in MODES if m in modes]


def human(size: int) -> str:
    for unit, scale in (("TiB", TIB), ("GiB", GIB), ("MiB", MIB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def mapped_estimate(mode: str, device_size: int, plugged: int) -> int:
    """Upper bound of the guest memory the mode maps as memslots while
    ``plugged`` plus the 1 GiB cycle are plugged (usable adds 256 MiB)."""
    if mode == "single":
        return device_size
    return min(device_size, plugged + CYCLE + (256 * MIB if mode == "usable" else 0))


def not_possible_reason(mode: str, device_size: int, plugged: int, mem_total: int) -> str | None:
    """Why a configuration cannot run here, or None when it can.

    The memslot metadata is estimated at 2.51 MiB per GiB of mapped memslot
    (rounded to whole GiB) and must stay within AFFORDABLE_SHARE of MemTotal.
    """
    if plugged + CYCLE > device_size:
        return f"{human(plugged)} plugged plus the {human(CYCLE)} cycle exceed the {human(device_size)} device"
    mapped = -(-mapped_estimate(mode, device_size, plugged) // GIB)
    need = mapped * METADATA_PER_GIB
    if need > AFFORDABLE_SHARE * mem_total:
        return (f"needs about {need / GIB:.1f} GiB of kernel memory for memslot metadata "
                f"({METADATA_PER_GIB / MIB:.2f} MiB per GiB x {mapped} GiB mapped), "
                f"the host has {mem_total / GIB:.1f} GiB (MemTotal)")
    return None


def mem_total() -> int:
    """MemTotal of /proc/meminfo in bytes."""
    return kmem.parse_flat_keyed(Path("/proc/meminfo").read_text())["MemTotal"] * 1024


def rss_bytes() -> int:
    """Resident set size of this process (second field of /proc/self/statm)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


# ----------------------------------------------------------------- results

@dataclass
class Case:
    """One mode x plugged size: what was measured, or why it was not."""

    mode: str
    device_size: int
    plugged: int
    not_possible: str | None = None
    error: str | None = None
    kernel_bytes: int | None = None          # metadata: minus the VM without device
    memslots: int | None = None              # device memslots mapped at `plugged`
    memslot_size: int | None = None
    create_s: float | None = None            # MachineMemory.plug of the device
    plug_s: float | None = None              # PLUG request(s) for 1 GiB, memslots in place
    unplug_s: float | None = None            # UNPLUG request(s) for that GiB
    resize_s: float | None = None            # set_requested_size(+1 GiB) before the plug
    cycle_memslots: int | None = None        # device memslots mapped while the GiB is plugged
    rss_before: int | None = None
    rss_touched: int | None = None
    rss_after: int | None = None
    kernel_after_cycle: int | None = None    # raw charge after the cycle (incl. page tables)

    @property
    def rss_returned_pct(self) -> float | None:
        """How far RSS after unplug is from RSS before the plug, in % of the latter."""
        if self.rss_before is None or self.rss_after is None:
            return None
        return 100.0 * (self.rss_after - self.rss_before) / self.rss_before


@dataclass
class Run:
    device_size: int
    host: dict[str, Any]
    baseline_bytes: int
    baseline_samples: list[int]
    cases: list[Case] = field(default_factory=list)
    overheads: list[Overhead] = field(default_factory=list)   # one per number of other memslots
    qemu: dict[str, Any] | None = None
    patterns: list[PatternCase] = field(default_factory=list)


# ----------------------------------------------------------------- measured work

def _request(dev: VirtioMem, kind: RequestType, offset: int, size: int) -> None:
    """PLUG/UNPLUG ``size`` bytes from ``offset`` in requests of at most 65535 blocks."""
    blocks, first = size // dev.block_size, offset // dev.block_size
    while blocks:
        n = min(blocks, MAX_NB_BLOCKS)
        raw = dev.handle(0, Request(kind, dev.addr + first * dev.block_size, n).pack(), 10)
        resp = Response.parse(raw) if raw is not None else None
        if resp is None or resp.type is not ResponseType.ACK:
            raise RuntimeError(f"{kind.name} of {n} blocks at block {first} answered {resp}")
        first, blocks = first + n, blocks - n


def _own_kernel_bytes(backend: kmem.KmemBackend) -> int:
    """The raw kernel charge of the cgroup this (measured) process is in."""
    return kmem.MemCgroup(backend.cgroup_dir_of(), backend).kernel_bytes()


def baseline_vm(device_size: int) -> Iterator[None]:
    """The machine of every case, without the device."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = MachineMemory(vm, BOOT_RAM, maxmem=device_size + 2 * GIB)
        yield None
        machine.close()


def device_case(backend: kmem.KmemBackend, mode: str, device_size: int,
                plugged: int) -> Iterator[dict[str, Any]]:
    """Machine + device + ``plugged`` untouched; read the charge; then the 1 GiB cycle."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        # not_possible_reason() already kept what this host cannot afford out
        machine = MachineMemory(vm, BOOT_RAM, maxmem=device_size + 2 * GIB,
                                metadata_limit=int(AFFORDABLE_SHARE * mem_total()))
        dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"),
                                       requested_size=plugged, memslots=MemslotMode(mode)))
        t0 = time.perf_counter()
        machine.plug(dev)
        out: dict[str, Any] = {"create_s": time.perf_counter() - t0}
        _request(dev, RequestType.PLUG, 0, plugged)
        out["kernel_raw"] = _own_kernel_bytes(backend)
        out["memslots"] = dev.nb_memslots
        out["memslot_size"] = dev.memslot_size

        t0 = time.perf_counter()
        dev.set_requested_size(plugged + CYCLE)
        out["resize_s"] = time.perf_counter() - t0
        out["rss_before"] = rss_bytes()
        t0 = time.perf_counter()
        _request(dev, RequestType.PLUG, plugged, CYCLE)
        out["plug_s"] = time.perf_counter() - t0
        out["cycle_memslots"] = dev.nb_memslots
        dev.memdev.populate(plugged, CYCLE)
        out["rss_touched"] = rss_bytes()
        t0 = time.perf_counter()
        _request(dev, RequestType.UNPLUG, plugged, CYCLE)
        out["unplug_s"] = time.perf_counter() - t0
        out["rss_after"] = rss_bytes()
        yield out
        machine.close()
        dev.memdev.close()


# ----------------------------------------------------------------- reporting

def _mib(n: int | None, digits: int = 1) -> str:
    return "-" if n is None else f"{n / MIB:.{digits}f}"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def format_table(run: Run) -> str:
    """The Markdown table of one run, one row per mode x plugged size."""
    head = ("| device | mode | plugged | kernel metadata MiB | memslots | create ms | plug 1 GiB ms "
            "| unplug 1 GiB ms | RSS before MiB | RSS touched MiB | RSS after unplug MiB | RSS returned |")
    rows = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for c in run.cases:
        lead = f"| {human(c.device_size)} | {c.mode} | {human(c.plugged) if c.plugged else '0'} |"
        if c.not_possible or c.error:
            why = f"not possible: {c.not_possible}" if c.not_possible else f"failed: {c.error}"
            rows.append(f"{lead} {why} |" + " |" * (head.count(" | ") - 3))
            continue
        pct = c.rss_returned_pct
        slots = (f"{c.memslots} x {human(c.memslot_size)}" if c.memslots and c.memslot_size
                 and c.mode != "exact" else str(c.memslots))
        rows.append(f"{lead} {_mib(c.kernel_bytes)} | {slots} | {_ms(c.create_s)} | "
                    f"{_ms(c.plug_s)} | {_ms(c.unplug_s)} | {_mib(c.rss_before)} | "
                    f"{_mib(c.rss_touched)} | {_mib(c.rss_after)} | "
                    f"{'-' if pct is None else f'{pct:+.2f} %'} |")
    return "\n".join(rows)


def _find(run: Run, mode: str, plugged: int) -> Case | None:
    for c in run.cases:
        if c.mode == mode and c.plugged == plugged and c.kernel_bytes is not None:
            return c
    return None


def evaluate_targets(run: Run) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for the targets of issue 7 this run can answer."""
    out: list[tuple[str, str, bool | None]] = []
    single0, dyn1, dyn0 = _find(run, "single", 0), _find(run, "dynamic", GIB), _find(run, "dynamic", 0)
    single1 = _find(run, "single", GIB) or single0
    if dyn1 and single1 and dyn1.kernel_bytes is not None and single1.kernel_bytes:
        ratio = single1.kernel_bytes / max(dyn1.kernel_bytes, 1)
        out.append((f"dynamic {human(run.device_size)}, 1 GiB plugged: metadata <= 1/500 of single",
                    f"{_mib(dyn1.kernel_bytes, 2)} MiB vs {_mib(single1.kernel_bytes)} MiB = 1/{ratio:.0f}",
                    ratio >= 500))
    if dyn0 and dyn0.kernel_bytes is not None:
        out.append(("dynamic, nothing plugged: within 1 MiB of the VM without device",
                    f"{dyn0.kernel_bytes / MIB:+.2f} MiB", abs(dyn0.kernel_bytes) <= MIB))
    if dyn0 and single0 and dyn0.create_s and single0.create_s:
        ratio = single0.create_s / dyn0.create_s
        out.append((f"create {human(run.device_size)} dynamic >= 100x faster than single",
                    f"{_ms(dyn0.create_s)} ms vs {_ms(single0.create_s)} ms = {ratio:.0f}x", ratio >= 100))
    if run.overheads:
        measured = "; ".join(
            f"among {o.others}: device {o.device_ratio:.2f}x"
            + (f", memory layer {o.memory_ratio:.2f}x" if o.memory_ratio else "")
            + f", Vm binding {o.vm_ratio:.2f}x" for o in run.overheads)
        out.append((f"Python overhead per memslot change <= {OVERHEAD_TARGET}x the bare ioctl",
                    measured, all(o.device_ratio <= OVERHEAD_TARGET for o in run.overheads)))
    pcts = [(c, c.rss_returned_pct) for c in run.cases if c.rss_returned_pct is not None]
    if pcts:
        worst = max(pcts, key=lambda p: abs(p[1]))
        plugged = human(worst[0].plugged) if worst[0].plugged else 0
        out.append(("after unplug, RSS within 1% of before the plug",
                    f"worst {worst[1]:+.2f} % ({worst[0].mode}, {plugged} plugged)",
                    all(abs(p) <= 1.0 for _, p in pcts)))
    if run.device_size >= 64 * TIB:
        ok = any(c.mode == "dynamic" and c.plug_s is not None for c in run.cases)
        out.append((f"{human(run.device_size)} dynamic starts and plugs 1 GiB",
                    "yes" if ok else "no", ok))
    return out


def format_targets(targets: list[tuple[str, str, bool | None]]) -> str:
    rows = ["| target | measured | met |", "|---|---|---|"]
    rows += [f"| {t} | {m} | {'yes' if ok else 'NO'} |" for t, m, ok in targets]
    return "\n".join(rows)


def format_report(run: Run) -> str:
    h = run.host
    parts = [f"### {human(run.device_size)} virtio-mem device",
             f"Host: Linux {h['kernel']}, {h['mem_total'] / GIB:.1f} GiB MemTotal, {h['backend']}; "
             f"VM without device: {_mib(run.baseline_bytes, 2)} MiB kernel memory "
             f"(median of {len(run.baseline_samples)}, spread "
             f"{_mib(max(run.baseline_samples) - min(run.baseline_samples), 2)} MiB).",
             "", format_table(run)]
    if run.overheads:
        parts += ["", format_overheads(run.overheads)]
    if run.qemu:
        q = run.qemu
        if q.get("kernel_bytes") is not None:
            parts += ["", f"QEMU {q['version']}, `{q['command']}`: "
                      f"{_mib(q['kernel_bytes'])} MiB kernel memory with the device, "
                      f"{_mib(q['baseline_bytes'])} MiB without (difference "
                      f"{_mib(q['kernel_bytes'] - q['baseline_bytes'])} MiB)"]
        else:
            parts += ["", f"QEMU: not measured: {q.get('error')}"]
    parts += ["", format_targets(evaluate_targets(run))]
    if run.patterns:
        parts += ["", format_patterns(run.patterns, run.device_size)]
    return "\n".join(parts) + "\n"


MARKDOWN_HEAD = """# Memslot metadata of a virtio-mem device, by memslot mode

Made by `scripts/bench_slots.py` (plot: `scripts/plot_slots.py`, `docs/slots-1t.png`).
Each row is one fresh process in its own memory cgroup: a pc machine with
1 GiB of boot RAM plus the device, `plugged` plugged and untouched. *kernel
metadata* is the cgroup's kernel charge minus the same machine without the
device. Then 1 GiB more is plugged, every page of it touched, and unplugged:
*plug/unplug 1 GiB* time the requests on the host side (memslots in place;
unplug includes giving the touched pages back), the RSS columns are read
before the plug, after touching and after the unplug.

![memslot metadata, 1 TiB device](slots-1t.png)

"""


def run_to_json(run: Run) -> dict[str, Any]:
    data = asdict(run)
    for c, raw in zip(run.cases, data["cases"]):
        raw["rss_returned_pct"] = c.rss_returned_pct
    for o, raw in zip(run.overheads, data["overheads"]):
        raw.update(device_ratio=o.device_ratio, vm_ratio=o.vm_ratio, memory_ratio=o.memory_ratio)
    data["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in evaluate_targets(run)]
    return data


def run_from_json(data: dict[str, Any]) -> Run:
    case_keys = Case.__dataclass_fields__.keys()
    cases = [Case(**{k: v for k, v in c.items() if k in case_keys}) for c in data["cases"]]
    raws = data.get("overheads") or ([data["overhead"]] if data.get("overhead") else [])
    overheads = [Overhead(**{k: o[k] for k in Overhead.__dataclass_fields__ if k in o}) for o in raws]
    patterns = [PatternCase(**{k: v for k, v in p.items() if k in PatternCase.__dataclass_fields__})
                for p in data.get("patterns", [])]
    return Run(data["device_size"], data["host"], data["baseline_bytes"], data["baseline_samples"],
               cases, overheads, data.get("qemu"), patterns)


# ----------------------------------------------------------------- driver

class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.done, self.width = total, 0, width
        self.start = time.monotonic()

    def step(self, label: str) -> None:
        filled = self.width * self.done // max(self.total, 1)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{time.monotonic() - self.start:6.1f}s {label:<40.40}")
        sys.stderr.flush()

    def advance(self, label: str = "") -> None:
        self.done += 1
        self.step(label)
        if self.done == self.total:
            sys.stderr.write("\n")


def run_benchmark(device_size: int, modes: list[str], plugged: list[int], baseline_runs: int,
                  overhead_memslots: list[int], qemu: bool) -> Run:
    backend = kmem.detect()
    total_mem = mem_total()
    steps = baseline_runs + len(modes) * len(plugged) + len(overhead_memslots) + int(qemu)
    bar = Progress(steps)
    samples = []
    for i in range(baseline_runs):
        bar.step(f"VM without device {i + 1}/{baseline_runs}")
        samples.append(kmem.measure(baseline_vm, device_size, backend=backend).kernel_bytes)
        bar.advance()
    host = {"kernel": platform.release(), "mem_total": total_mem, "backend": backend.kind,
            "python": platform.python_version()}
    run = Run(device_size, host, int(statistics.median(samples)), samples)
    for mode in modes:
        for size in plugged:
            bar.step(f"{mode} {human(size) if size else 0} plugged")
            case = Case(mode, device_size, size,
                        not_possible=not_possible_reason(mode, device_size, size, total_mem))
            if case.not_possible is None:
                try:
                    m = kmem.measure(device_case, backend, mode, device_size, size, backend=backend)
                except kmem.KmemError as exc:
                    case.error = str(exc).splitlines()[0]
                else:
                    r = m.result
                    case.kernel_bytes = r["kernel_raw"] - m.baseline_bytes - run.baseline_bytes
                    case.kernel_after_cycle = m.kernel_bytes
                    for key in ("memslots", "memslot_size", "create_s", "plug_s", "unplug_s", "resize_s",
                                "cycle_memslots", "rss_before", "rss_touched", "rss_after"):
                        setattr(case, key, r[key])
            run.cases.append(case)
            bar.advance()
    for others in overhead_memslots:
        bar.step(f"memslot change among {others}: kvmmem vs ioctl")
        run.overheads.append(measure_overhead(others=others))
        bar.advance()
    if qemu:
        bar.step("QEMU")
        run.qemu = measure_qemu(device_size, backend)
        bar.advance()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device-size", type=parse_size, default=TIB, help="device size (default 1T)")
    parser.add_argument("--plugged", type=parse_sizes, default=parse_sizes("0,1,16,64"),
                        help="plugged sizes, comma-separated (bare number = GiB; default 0,1,16,64)")
    parser.add_argument("--modes", type=parse_modes, default=list(MODES),
                        help="memslot modes, comma-separated (default single,usable,dynamic,exact)")
    parser.add_argument("--patterns", action="store_true",
                        help="also the plug patterns in dynamic and exact mode, beside their floor")
    parser.add_argument("--only-patterns", action="store_true",
                        help="only the plug patterns (with --device-size)")
    parser.add_argument("--pattern-runs", type=int, default=7,
                        help="runs of each pattern for the request times, alternating "
                             "between the modes (default 7)")
    parser.add_argument("--baseline-runs", type=int, default=5, help="runs of the VM without device")
    parser.add_argument("--overhead-memslots", default="0,1000",
                        help="measure a memslot change through kvmmem against the bare ioctl among "
                             "this many other memslots, comma-separated (default 0,1000)")
    parser.add_argument("--no-overhead", action="store_true", help="skip the kvmmem-vs-ioctl comparison")
    parser.add_argument("--qemu", action="store_true", help="also measure qemu-system-x86_64 (if installed)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown report here")
    parser.add_argument("--from-json", type=Path, nargs="+", metavar="JSON",
                        help="do not measure: render the Markdown of earlier runs")
    args = parser.parse_args(argv)
    if args.device_size <= 0 or args.device_size % GIB:
        parser.error("--device-size must be a positive multiple of 1 GiB")
    if any(p % GIB for p in args.plugged):
        parser.error("--plugged sizes must be whole GiB")
    if args.baseline_runs < 1:
        parser.error("--baseline-runs must be at least 1")

    if args.from_json:
        runs = [run_from_json(json.loads(p.read_text())) for p in args.from_json]
    else:
        others = [] if args.no_overhead or args.only_patterns else \
            [int(n) for n in args.overhead_memslots.split(",")]
        runs = [run_benchmark(args.device_size, [] if args.only_patterns else args.modes,
                              args.plugged, args.baseline_runs, others, args.qemu)]
        if args.patterns or args.only_patterns:
            runs[0].patterns = run_patterns(args.device_size, runs=args.pattern_runs,
                                            progress=lambda label: print(f"[{label}]", file=sys.stderr))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(run_to_json(runs[0]), indent=2) + "\n")
    report = "\n".join(format_report(r) for r in runs)
    if args.markdown:
        args.markdown.write_text(MARKDOWN_HEAD + report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
