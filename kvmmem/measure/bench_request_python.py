"""Where a virtio-mem request's overhead over the bare ioctl comes from.

An experiment, not a test: the device's KVM ioctl is replaced in this
process (``kvmmem.kvm._fd.lib``) so that only the request's Python is timed.

1. The request's Python per memslot change, requests back to back (the
   ioctl does nothing).
2. The same with a 300 us sleep where the ioctl was (about what creating or
   deleting a 1 GiB memslot takes here): does a pause alone slow it down?
3. A tight Python loop of about the request's warm cost put beside the real
   create+delete ioctls, against the bare ioctls (paired per round as in
   bench_overhead.py): what the same amount of plain Python work costs there.
"""

from __future__ import annotations

import argparse
import fcntl
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import kvmmem.kvm._fd as fd_module
from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import Request, RequestType
from kvmmem.kvm import Kvm, lib
from kvmmem.measure.bare_ioctl import SET_USER_MEMORY_REGION, memory_region
from kvmmem.memory import HostMemory
from kvmmem.vmm.machine_memory import MachineMemory

GIB = 1 << 30
PAUSE_S = 300e-6


class _Ioctls:
    """``lib`` with the ioctl replaced by ``stand_in``; the rest passes through."""

    def __init__(self, stand_in: Callable[[], None]) -> None:
        self._stand_in = stand_in

    def __getattr__(self, name: str) -> Any:
        return getattr(lib, name)

    def kvmmem_ioctl_ptr(self, fd: int, request: int, arg: Any) -> int:
        self._stand_in()
        return 0


def request_python(rounds: int, batch: int, pause_s: float) -> float:
    """Median Python time per memslot change of the device's plug/unplug pair,
    with ``pause_s`` of sleep in place of each ioctl (not counted)."""
    paused = [0.0]

    def stand_in() -> None:
        if pause_s:
            t0 = time.perf_counter()
            time.sleep(pause_s)
            paused[0] += time.perf_counter() - t0

    with Kvm() as kvm, kvm.create_vm() as vm:
        machine = MachineMemory(vm, GIB, maxmem=8 * GIB)
        dev = VirtioMem(VirtioMemProps(id="vmem0", memdev=HostMemory(4 * GIB, "mem0"),
                                       requested_size=4 * GIB, memslots=MemslotMode.DYNAMIC))
        machine.plug(dev)
        gpa = dev.addr + dev.memslot_size
        plug = Request(RequestType.PLUG, gpa, 1).pack()
        unplug = Request(RequestType.UNPLUG, gpa, 1).pack()
        vars(fd_module)["lib"] = _Ioctls(stand_in)
        try:
            samples = []
            for _ in range(rounds):
                paused[0] = 0.0
                t0 = time.perf_counter()
                for _ in range(batch):
                    dev.handle(0, plug, 10)
                    dev.handle(0, unplug, 10)
                samples.append((time.perf_counter() - t0 - paused[0]) / (2 * batch))
        finally:
            vars(fd_module)["lib"] = lib
            machine.close()
            dev.memdev.close()
    return statistics.median(samples)


def tight_loop(iterations: int) -> None:
    d: dict[int, tuple[int, int]] = {}
    for i in range(iterations):
        d[i & 63] = (i, i * 3)


def tight_loop_ratio(iterations: int, rounds: int, batch: int) -> tuple[float, float]:
    """(warm seconds of the loop, paired ratio of loop + ioctl against the ioctl)."""
    warm = statistics.median(_timed(lambda: tight_loop(iterations)) for _ in range(500))
    with Kvm() as kvm, kvm.create_vm() as vm:
        host = HostMemory(2 * GIB, "mem0")
        create = memory_region(5, 1 << 32, GIB, host.address)
        delete = memory_region(5, 1 << 32, 0, host.address)
        request = SET_USER_MEMORY_REGION

        def with_loop() -> None:
            for _ in range(batch):
                tight_loop(iterations)
                fcntl.ioctl(vm.fd, request, create)
                tight_loop(iterations)
                fcntl.ioctl(vm.fd, request, delete)

        def bare() -> None:
            for _ in range(batch):
                fcntl.ioctl(vm.fd, request, create)
                fcntl.ioctl(vm.fd, request, delete)

        ratios = [_timed(with_loop) / _timed(bare) for _ in range(rounds)]
        host.close()
    return warm, statistics.median(ratios)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=20)
    args = parser.parse_args(argv)
    back_to_back = request_python(args.rounds, args.batch, 0.0)
    after_pause = request_python(args.rounds, args.batch, PAUSE_S)
    print(f"virtio-mem request, Python per memslot change: {back_to_back * 1e6:.1f} us back to back, "
          f"{after_pause * 1e6:.1f} us with a {PAUSE_S * 1e6:.0f} us sleep in place of each ioctl")
    for iterations in (200, 400):
        warm, ratio = tight_loop_ratio(iterations, args.rounds, args.batch)
        print(f"tight Python loop of {warm * 1e6:.1f} us beside each ioctl: {ratio:.2f}x the bare ioctl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
