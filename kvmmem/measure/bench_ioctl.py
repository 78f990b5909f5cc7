"""Cost of one memslot change through kvmmem against the bare ioctl.

Creates and deletes one 1 GiB memslot, alternating batches through
``Vm.add_memslot``/``Vm.delete_memslot`` and through ``fcntl.ioctl`` with a
packed ``struct kvm_userspace_memory_region``, in the same VM and run, and
reports the median cost of each and their ratio (target: at most 1.2).
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import sys
import time

from kvmmem.kvm import Kvm
from kvmmem.measure.bare_ioctl import SET_USER_MEMORY_REGION, memory_region
from kvmmem.memory import HostMemory

GIB = 1 << 30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=1, help="memslot size in GiB (default 1)")
    parser.add_argument("--rounds", type=int, default=30, help="batches per method")
    parser.add_argument("--batch", type=int, default=20, help="create+delete pairs per batch")
    args = parser.parse_args()
    size = args.size * GIB

    host = HostMemory(size, "bench")
    addr = host.address
    gpa = 4 * GIB
    request = SET_USER_MEMORY_REGION
    create = memory_region(0, gpa, size, addr)
    delete = memory_region(0, gpa, 0, addr)

    with Kvm() as kvm, kvm.create_vm() as vm:
        def via_kvmmem() -> None:
            for _ in range(args.batch):
                slot = vm.add_memslot(gpa, size, addr)
                vm.delete_memslot(slot)

        def via_fcntl() -> None:
            for _ in range(args.batch):
                fcntl.ioctl(vm.fd, request, create)
                fcntl.ioctl(vm.fd, request, delete)

        samples: dict[str, list[float]] = {"kvmmem": [], "fcntl.ioctl": []}
        via_kvmmem()  # warm up both paths
        via_fcntl()
        for _ in range(args.rounds):
            for name, fn in (("kvmmem", via_kvmmem), ("fcntl.ioctl", via_fcntl)):
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) / args.batch)
        assert vm.used_memslots == 0

    host.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["kvmmem"] / med["fcntl.ioctl"]
    print(f"create+delete one {args.size} GiB memslot, median of {args.rounds} batches of {args.batch}:")
    for name, value in med.items():
        print(f"  {name:<12} {value * 1e6:9.1f} us")
    verdict = "within" if ratio <= 1.2 else "ABOVE"
    print(f"  ratio        {ratio:9.3f}  ({verdict} the 1.2x target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
