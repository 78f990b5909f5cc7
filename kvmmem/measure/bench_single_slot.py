"""Kernel memory and creation time of one KVM memslot, by size.

Each size runs in a fresh child in its own memory cgroup (kvmmem.measure.kmem):
create a VM, map an anonymous MAP_NORESERVE region of that size, add it as
one memslot and read the kernel charge while the VM is still open. The
empty VM is measured the same way and subtracted. The last column is the
number measured before on a shadow-MMU host for the same size (``REFERENCE_MIB``).
"""

from __future__ import annotations

import argparse
import json
import mmap
import re
import sys
import time
from collections.abc import Iterator

from kvmmem import units
from kvmmem.kvm import Kvm
from kvmmem.measure import kmem
from kvmmem.memory import HostMemory

MIB, GIB = 1 << 20, 1 << 30
PAGE = mmap.PAGESIZE
# MiB of kernel metadata for one memslot of that size, measured before on a
# shadow-MMU host (Linux 6.x, KVM in PVM mode): about 2.5 MiB per GiB.
REFERENCE_MIB = {64 * GIB: 160, 256 * GIB: 643, 1024 * GIB: 2571}


def _bench_spelling(text: str) -> str:
    """``16 GiB`` as QEMU spells it (``16G``): the benchmarks take both."""
    return re.sub(r"([kmgtpe])i?b$", r"\1", re.sub(r"\s+", "", text), flags=re.IGNORECASE)


def parse_size(text: str) -> int:
    """``64``, ``64G``, ``512M``, ``1T`` (a bare number is GiB) to bytes."""
    try:
        size = units.parse_size(_bench_spelling(text), default_unit=GIB)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad size: {exc}") from None
    if size <= 0 or size % PAGE:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of {PAGE} bytes")
    return size


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()]


def human(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB)):
        if size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def one_slot(size: int) -> Iterator[float]:
    """A VM with one memslot of ``size`` (none if 0); yields the ioctl time."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        if size == 0:
            yield 0.0
            return
        host = HostMemory(size)
        try:
            start = time.perf_counter()
            vm.add_memslot(0, size, host.address)
            yield time.perf_counter() - start
        finally:
            vm.close()
            host.close()


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1,64,256,1T"),
                        help="comma-separated memslot sizes (bare number = GiB; M, G, T suffixes); "
                             "default 1,64,256,1T")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    args = parser.parse_args()

    try:
        backend = kmem.detect()
    except kmem.KmemUnavailable as exc:
        print(f"cannot measure kernel memory: {exc}", file=sys.stderr)
        return 2

    base = kmem.measure(one_slot, 0, backend=backend)
    rows = []
    header = (f"{'memslot':>9} {'kernel MiB':>11} {'peak MiB':>9} {'MiB/GiB':>8} "
              f"{'create ms':>10} {'VmallocUsed MiB':>16} {'before MiB':>10}")
    print(f"backend {backend.kind} in {backend.parent}")
    print(f"empty VM: {mib(base.kernel_bytes)} MiB kernel memory (subtracted below)")
    print(header)
    print("-" * len(header))
    for size in args.sizes:
        m = kmem.measure(one_slot, size, backend=backend)
        extra = m.kernel_bytes - base.kernel_bytes
        peak = None if m.peak_kernel_bytes is None else m.peak_kernel_bytes - base.kernel_bytes
        facts = REFERENCE_MIB.get(size)
        print(f"{human(size):>9} {mib(extra):>11} {mib(peak):>9} {extra / MIB / (size / GIB):>8.2f} "
              f"{m.result * 1e3:>10.1f} {mib(m.vmalloc_used_delta):>16} {facts if facts else '-':>10}")
        rows.append({"size": size, "kernel_bytes": extra, "peak_kernel_bytes": peak,
                     "create_seconds": m.result, "vmalloc_used_delta": m.vmalloc_used_delta,
                     "reference_mib": facts, "backend": m.backend})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"empty_vm_kernel_bytes": base.kernel_bytes, "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
