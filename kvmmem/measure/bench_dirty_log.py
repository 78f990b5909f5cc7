"""What dirty logging costs with a 1 TiB virtio-mem device and 1 GiB plugged
(issue 21: "extra kernel memory during migration <= 0.5 MiB, extra VMM RSS
<= 2 MiB"; QEMU 10 with dynamic-memslots=on: +4.4 MiB and +32.5 MiB).

Each case is a child in its own memory cgroup (:mod:`kvmmem.measure.kmem`):
a pc machine (1 GiB of boot RAM) with the device, 1 GiB plugged
(contiguous, or one block in each of 512 GiBs), then the kernel memory and
the VMM's RSS are read, logging is started on every memslot
(``KvmMemoryListener.start_dirty_log``), one sync is made, every plugged page
and all boot RAM are marked dirty in the VMM's log (the most it can hold),
and both are read again. ``single`` (one memslot over the whole 1 TiB, as
QEMU without dynamic memslots) is the comparison.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import RequestType
from kvmmem.kvm import Kvm
from kvmmem.measure import kmem
from kvmmem.measure.bench_patterns import BLOCK, _send, pattern_requests
from kvmmem.memory import HostMemory
from kvmmem.memory.dirty_log import DirtyLog
from kvmmem.vmm.machine_memory import MachineMemory

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40


def process_rss(pid: int | str = "self") -> int:
    """The resident set of process ``pid`` (this one by default), in bytes;
    0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def logging_case(backend: kmem.KmemBackend, mode: str, pattern: str,
                 device_size: int) -> Iterator[dict[str, Any]]:
    """One case (see the module doc); its deltas."""
    def kernel() -> int:
        return kmem.MemCgroup(backend.cgroup_dir_of(), backend).kernel_bytes()

    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = MachineMemory(vm, GIB, maxmem=device_size + 2 * GIB)
        span = max(offset + size for offset, size in pattern_requests(pattern))
        dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"),
                                       block_size=BLOCK, memslots=MemslotMode(mode),
                                       requested_size=span))
        machine.plug(dev)
        if mode != "single":
            for offset, size in pattern_requests(pattern):
                _send(dev, RequestType.PLUG, offset, size)
        else:
            for offset, size in pattern_requests(pattern):
                dev.memdev.populate(offset, size)
        dev.merge_memslots()
        k0, rss0 = kernel(), process_rss()
        log = DirtyLog()
        t0 = time.perf_counter()
        machine.kvm_listener.start_dirty_log(log)
        enable_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        machine.kvm_listener.sync_dirty_log()
        sync_s = time.perf_counter() - t0
        for offset, size in pattern_requests(pattern):        # the most the VMM can hold
            log.mark(dev.memdev, offset, size)
        log.mark(machine.ram_host, 0, GIB)
        k1, rss1 = kernel(), process_rss()
        yield {"kernel": k1 - k0, "rss": rss1 - rss0, "bitmap": log.bitmap_bytes,
               "memslots": len(vm.memslots), "enable_s": enable_s, "sync_s": sync_s}
        machine.kvm_listener.stop_dirty_log()
        machine.close()
        dev.memdev.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="dynamic,exact,single")
    parser.add_argument("--patterns", default="contiguous,scattered")
    parser.add_argument("--device-size", type=int, default=TIB)
    args = parser.parse_args(argv)
    backend = kmem.detect()
    print(f"dirty logging, {args.device_size // GIB} GiB device, 1 GiB plugged, 1 GiB boot RAM:")
    print(f"  {'pattern':<11} {'mode':<8} {'memslots':>8} {'kernel':>11} {'VMM RSS':>10} "
          f"{'bitmaps':>9} {'enable':>9} {'sync':>8}")
    for pattern in args.patterns.split(","):
        for mode in args.modes.split(","):
            r = kmem.measure(logging_case, backend, mode, pattern, args.device_size,
                             backend=backend).result
            print(f"  {pattern:<11} {mode:<8} {r['memslots']:>8} {r['kernel'] / MIB:>+9.2f}Mi "
                  f"{r['rss'] / MIB:>+8.2f}Mi {r['bitmap'] / 1024:>7.0f}Ki "
                  f"{r['enable_s'] * 1e3:>7.1f}ms {r['sync_s'] * 1e3:>6.1f}ms")
    return 0
