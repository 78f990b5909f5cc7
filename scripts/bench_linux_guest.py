"""Linux's virtio_mem driver under ``kvmmem run``: times and KVM kernel memory.

Boots the test kernel of ``make linux-guest`` (see tests/linux/) and reports:

* the time from starting the VMM to the driver's probe line and to the
  in-kernel monitor's first report;
* the time per 128 MiB the driver plugs and unplugs (``requested-size`` set
  over QMP, until the guest's report shows the memory online or gone);
* for each memslot mode, the kernel memory (memory cgroup, via
  :mod:`kvmmem.measure.kmem`) charged to the VM (the VMM process and its KVM
  objects) with ``--plugged`` plugged into a ``--device-size`` device.

    .venv/bin/python scripts/bench_linux_guest.py --device-size 256G --plugged 1G
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "linux"))

from linux_guest import MEMORY_BLOCK, Device, LinuxGuest, MiB, Report

from kvmmem.measure import kmem
from kvmmem.units import parse_size

TIMEOUT = 1200


def _boot(guest: LinuxGuest) -> tuple[Report, dict[str, float]]:
    boot = guest.wait_report("the first report", lambda r: bool(r.devices), 0, TIMEOUT)
    probe = next(t for t, line in guest.lines if "virtio_mem virtio0: start address" in line)
    first = next(t for t, line in guest.lines if "kvmmem-guest:" in line)
    return boot, {"probe_s": round(probe, 1), "first_report_s": round(first, 1)}


def _resize(guest: LinuxGuest, boot: Report, size: int) -> float:
    """Seconds from the qom-set to the report that shows ``size`` plugged and
    MemTotal following."""
    start = guest.now()
    guest.set_requested("vmem0", size)

    def done(r: Report) -> bool:
        plugged, requested = r.devices.get("virtio0", (-1, -1))
        return (plugged, requested) == (size, size) and \
            r.memtotal_kb == boot.memtotal_kb + size // 1024 and \
            r.online_blocks == boot.online_blocks + size // MEMORY_BLOCK

    report = guest.wait_report(f"{size:#x} plugged", done, start, TIMEOUT)
    return report.at - start


def timings(device_size: int, plugged: int) -> dict[str, Any]:
    with LinuxGuest([Device("vmem0", device_size, memslots="dynamic", protect="block")],
                    maxmem=f"{(device_size >> 30) + 4}G") as guest:
        boot, result = _boot(guest)
        steps = plugged / (128 * MiB)
        plug = _resize(guest, boot, plugged)
        unplug = _resize(guest, boot, 0)
    return {**result, "plug_s_per_128MiB": round(plug / steps, 1),
            "unplug_s_per_128MiB": round(unplug / steps, 1)}


def _kmem_run(mode: str, device_size: int, plugged: int) -> Iterator[dict[str, Any]]:
    protect = "slot" if mode == "single" else "block"
    with LinuxGuest([Device("vmem0", device_size, memslots=mode, protect=protect)],
                    maxmem=f"{(device_size >> 30) + 4}G") as guest:
        boot, _ = _boot(guest)
        if plugged:
            _resize(guest, boot, plugged)
        slots = [s for s in guest.cmd("x-query-memslots") if s.get("device") == "vmem0"]
        yield {"memslots": len(slots), "memslot_bytes": sum(s["size"] for s in slots)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device-size", default="256G")
    ap.add_argument("--plugged", default="1G")
    ap.add_argument("--modes", default="dynamic,single")
    ap.add_argument("--no-timings", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device_size, plugged = parse_size(args.device_size), parse_size(args.plugged)
    results: dict[str, Any] = {"device_size": device_size, "plugged": plugged}
    if not args.no_timings:
        results["timings"] = timings(device_size, plugged)
        print(f"timings: {results['timings']}", flush=True)
    for mode in args.modes.split(","):
        started = time.monotonic()
        m = kmem.measure(_kmem_run, mode, device_size, plugged)
        results[mode] = {"kernel_MiB": round(m.kernel_bytes / MiB, 1), **m.result,
                         "wall_s": round(time.monotonic() - started, 1)}
        print(f"{mode}: {results[mode]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
