"""Commit cost of the memory model on real KVM.

1. A container maps 1000 unmergeable 1 GiB aliases of one NORESERVE mapping
   (1000 KVM memslots); adding the 1001st is timed and its
   KVM_SET_USER_MEMORY_REGION calls are counted.
2. The same with N = 10, 100, 1000, 10000 mapped aliases of 2 MiB (10000
   slots of 1 GiB would need ~25 GiB of KVM metadata on a shadow-MMU host):
   commit time of adding and of removing one alias: a spliced commit costs
   the same whatever the number of ranges (a full rendering would grow
   with it).

Times are the median of several add/remove rounds, each a whole commit
(splice or rendering, listener calls, ioctl).
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvmmem.kvm import Kvm
from kvmmem.memory import AddressSpace, HostMemory, KvmMemoryListener, MemoryRegion, memory_transaction

MiB = 1 << 20
GiB = 1 << 30
SET_REGION = "KVM_SET_USER_MEMORY_REGION"


def measure(kvm: Kvm, mapped: int, alias_size: int, rounds: int) -> dict[str, float]:
    """Map ``mapped`` aliases, then time adding/removing one more ``rounds`` times."""
    host = HostMemory((mapped + 1) * alias_size, "mem0")
    vm = kvm.create_vm()
    system = MemoryRegion.container("system", 1 << 64)
    mem0 = MemoryRegion.ram("mem0", host)
    container = MemoryRegion.container("virtio-mem-memslots", (mapped + 1) * alias_size)
    system.add_subregion(0x140000000, container)
    space = AddressSpace(system, "memory")
    space.add_listener(KvmMemoryListener(vm))
    aliases = [MemoryRegion.alias(f"virtio-mem-memslot-{i}", mem0, i * alias_size, alias_size,
                                  unmergeable=True) for i in range(mapped + 1)]
    try:
        t0 = time.perf_counter()
        with memory_transaction():
            for i in range(mapped):
                container.add_subregion(i * alias_size, aliases[i])
        setup = time.perf_counter() - t0
        assert vm.used_memslots == mapped
        adds, dels, ioctls = [], [], []
        for _ in range(rounds):
            before = vm.ioctl_counts[SET_REGION]
            t0 = time.perf_counter()
            container.add_subregion(mapped * alias_size, aliases[mapped])
            adds.append(time.perf_counter() - t0)
            ioctls.append(vm.ioctl_counts[SET_REGION] - before)
            t0 = time.perf_counter()
            container.del_subregion(aliases[mapped])
            dels.append(time.perf_counter() - t0)
        return {"ranges": len(space.flatview) + 1, "setup_s": setup,
                "add_ms": statistics.median(adds) * 1e3, "del_ms": statistics.median(dels) * 1e3,
                "ioctls": max(ioctls)}
    finally:
        space.destroy()
        vm.close()
        host.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 100, 1000, 10000])
    args = parser.parse_args()
    with Kvm() as kvm:
        r = measure(kvm, 1000, GiB, args.rounds)
        print("1001st 1 GiB alias next to 1000 mapped (1000 memslots):")
        print(f"  ioctls {SET_REGION}: {r['ioctls']}")
        print(f"  commit time: add {r['add_ms']:.2f} ms, remove {r['del_ms']:.2f} ms "
              f"(median of {args.rounds}); mapping the 1000 in one commit took "
              f"{r['setup_s']:.2f} s")
        print()
        print("commit time vs. number of ranges (2 MiB unmergeable aliases):")
        print(f"  {'ranges':>7} {'add ms':>8} {'remove ms':>10} {'us/range':>9} {'ioctls':>7}")
        for n in args.sizes:
            r = measure(kvm, n, 2 * MiB, args.rounds)
            print(f"  {n + 1:>7} {r['add_ms']:>8.2f} {r['del_ms']:>10.2f} "
                  f"{r['add_ms'] * 1e3 / (n + 1):>9.2f} {r['ioctls']:>7}")


if __name__ == "__main__":
    main()
