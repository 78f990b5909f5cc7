"""Memslot changes next to a busy vhost-user disk: the I/O pause, and the KVM
metadata by memslot mode with the back-end attached (issue 19).

**Pause.** A pc machine (256 MiB of shared boot RAM) with a 32 GiB
``memslots=exact`` device (2 MiB blocks, merges run by hand) and a
vhost-user-blk disk served by a real qemu-storage-daemon (optionally behind
a throttle group). A thread plays the guest: it writes one request after the
other from a buffer in a plugged block, each with its own pattern, holding a
lock while it fills the ring and kicks, as a vCPU runs guest code; the KVM
listener's ``pause_vcpus`` takes that lock, as the machine's vCPU gate stops
the vCPU. Meanwhile the main thread, in cycles, plugs eight blocks one by
one next to the buffer's, merges them (a memslot over plugged memory
replaced), unplugs one of them (a split) and unplugs the rest. For each
change that stopped the back-end the pause (``VhostUserBlk.pauses``: kick,
wait for requests in flight, stop the rings, the memslot change, restart) is
reported, with the writer's request latencies and every request's status;
after the run the image must hold the last request's pattern.

**Metadata.** The patterns of :mod:`bench_patterns` (1 TiB device) with the
daemon attached, each case a child in its own memory cgroup; the daemon's
32 memory slots (QEMU 7.2) leave the device 16 memslots of 64 GiB, so
``dynamic`` maps 64 GiB for any block, ``exact`` the plugged blocks (or, past
its budget, what ``dynamic`` maps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMem, VirtioMemProps
from kvmmem.devices.virtio_mem_proto import RequestType
from kvmmem.kvm import Kvm, Vm
from kvmmem.measure import kmem
from kvmmem.measure.bench_patterns import BLOCK, _send, pattern_requests
from kvmmem.measure.vhost_disk import SECTOR, VIRTIO_BLK_T_OUT, Backend, HostBlkDriver, start_backend
from kvmmem.memory import HostMemory
from kvmmem.memory.guest_memory import GuestMemory
from kvmmem.vhost.backends import VhostBackend, VhostBackends
from kvmmem.vhost.vhost_user_blk import VhostUserBlkProps
from kvmmem.vmm.machine_memory import MachineMemory

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
RAM = 256 * MIB
RING = 0x100000
BASE, GSI = 0xD0001000, 6
IO_SECTOR = 64


class _Rig:
    """Machine memory, the disk's transport and a device, in this process."""

    def __init__(self, vm: Vm, socket: str, device_size: int, mode: str,
                 requested: int) -> None:
        vm.create_irqchip()
        self.mem = MachineMemory(vm, RAM, maxmem=RAM + device_size,
                                 ram_host=HostMemory(RAM, "pc.ram", shared=True))
        self.gm = GuestMemory(self.mem.address_space)
        self.vhost = VhostBackends(self.mem, vm, self.gm)
        self.disk: VhostBackend = self.vhost.connect(VhostUserBlkProps("disk0", "c0", socket))
        self.dev = VirtioMem(VirtioMemProps(
            id="vmem0", memdev=HostMemory(device_size, "mem0", shared=True), block_size=BLOCK,
            memslots=MemslotMode(mode), requested_size=requested, merge_delay=3_600_000))
        self.mem.plug(self.dev)
        transport = self.vhost.realize("disk0", BASE, GSI)
        self.mem.system.add_subregion(BASE, transport.region)
        self.drv = HostBlkDriver(transport, self.gm, ring_gpa=RING)
        self.drv.setup()

    def close(self) -> None:
        self.vhost.close()
        self.mem.close()
        self.dev.memdev.close()


def _pattern(n: int, size: int) -> bytes:
    return (n.to_bytes(4, "little") * (size // 4 + 1))[:size]


def io_pauses(backend: Backend, cycles: int = 50, io_size: int = 64 * 1024) -> dict[str, Any]:
    """The pause of each memslot change under a busy disk (see the module doc)."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        rig = _Rig(vm, backend.socket, 32 * GIB, "exact", 1 * GIB)
        guest = threading.Lock()          # held while the "vCPU" submits

        @contextmanager
        def paused() -> Iterator[None]:
            with guest:
                yield
        rig.mem.kvm_listener.pause_vcpus = paused
        stop = threading.Event()
        latencies: list[float] = []
        statuses: list[int] = []
        buf = rig.dev.addr + BLOCK // 2           # in block 0, plugged below
        last = [0]

        def writer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                with guest:
                    rig.gm.write(buf, _pattern(n, io_size))
                    t0 = time.perf_counter()
                    ticket = rig.drv.begin(VIRTIO_BLK_T_OUT, IO_SECTOR, buf, io_size)
                statuses.append(rig.drv.finish(ticket, timeout=60))
                latencies.append(time.perf_counter() - t0)
                last[0] = n

        _send(rig.dev, RequestType.PLUG, 0, BLOCK)
        thread = threading.Thread(target=writer, name="writer")
        thread.start()
        changes = 0
        try:
            for _ in range(cycles):
                for b in range(1, 9):              # eight 2 MiB memslots next to block 0's
                    _send(rig.dev, RequestType.PLUG, b * BLOCK, BLOCK)
                rig.dev.merge_memslots()            # 16 MiB memslot over blocks 0-7, 2 MiB over 8
                _send(rig.dev, RequestType.UNPLUG, 4 * BLOCK, BLOCK)      # split
                for b in (1, 2, 3, 5, 6, 7, 8):
                    _send(rig.dev, RequestType.UNPLUG, b * BLOCK, BLOCK)
                changes += 2
        finally:
            stop.set()
            thread.join()
        image_ok = backend.read_image(IO_SECTOR * SECTOR, io_size) == _pattern(last[0], io_size)
        pauses = list(rig.disk.device.pauses)
        rig.close()
    return {"pauses_s": pauses, "latencies_s": latencies, "requests": len(statuses),
            "failed": sum(1 for s in statuses if s != 0), "image_ok": image_ok,
            "changes": changes, "io_size": io_size}


def _kernel_bytes(backend: kmem.KmemBackend) -> int:
    return kmem.MemCgroup(backend.cgroup_dir_of(), backend).kernel_bytes()


def vhost_pattern(backend: kmem.KmemBackend, socket: str, mode: str | None, pattern: str,
                  device_size: int) -> Iterator[dict[str, Any]]:
    """The machine with the disk attached; with ``mode``, a device and the pattern."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        vm.create_irqchip()
        mem = MachineMemory(vm, RAM, maxmem=RAM + device_size,
                            ram_host=HostMemory(RAM, "pc.ram", shared=True))
        vhost = VhostBackends(mem, vm, GuestMemory(mem.address_space))
        vhost.connect(VhostUserBlkProps("disk0", "c0", socket))
        out: dict[str, Any] = {}
        dev = None
        if mode is not None:
            span = max(offset + size for offset, size in pattern_requests(pattern))
            dev = VirtioMem(VirtioMemProps(
                id="vmem0", memdev=HostMemory(device_size, "mem0", shared=True),
                block_size=BLOCK, memslots=MemslotMode(mode), requested_size=span))
            mem.plug(dev)
            for offset, size in pattern_requests(pattern):
                _send(dev, RequestType.PLUG, offset, size)
            dev.merge_memslots()
            out = {"memslots": dev.nb_memslots, "memslot_size": dev.memslot_size}
        out["kernel_raw"] = _kernel_bytes(backend)
        yield out
        vhost.close()
        mem.close()
        if dev is not None:
            dev.memdev.close()


def metadata(socket: str, patterns: tuple[str, ...], device_size: int = TIB
             ) -> list[dict[str, Any]]:
    """KVM metadata per pattern and mode with the disk attached (MiB over the baseline)."""
    backend = kmem.detect()
    base = statistics.median(
        kmem.measure(vhost_pattern, backend, socket, None, "", device_size, backend=backend)
        .kernel_bytes for _ in range(3))
    rows = []
    for pattern in patterns:
        for mode in ("dynamic", "exact"):
            m = kmem.measure(vhost_pattern, backend, socket, mode, pattern, device_size,
                             backend=backend)
            rows.append({"pattern": pattern, "mode": mode, "memslots": m.result["memslots"],
                         "memslot_size": m.result["memslot_size"],
                         "mib": (m.result["kernel_raw"] - m.baseline_bytes - base) / MIB})
    return rows


def _ms(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"median {statistics.median(values) * 1e3:.2f} ms, "
            f"max {max(values) * 1e3:.2f} ms ({len(values)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--bps", type=int, action="append",
                        help="throttle the disk to this many bytes/s (repeatable; 0: none)")
    parser.add_argument("--patterns", default="contiguous,scattered,linux")
    parser.add_argument("--no-metadata", action="store_true")
    args = parser.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for bps in args.bps or [0, 16 * MIB]:
            backend = start_backend(Path(tmp), f"disk{bps}", 64 * MIB, bps)
            try:
                r = io_pauses(backend, args.cycles)
            finally:
                backend.kill()
            throttle = f"throttled to {bps / MIB:g} MiB/s" if bps else "not throttled"
            print(f"I/O pause per memslot change, disk {throttle}, {r['io_size'] // 1024} KiB "
                  f"writes, {r['changes']} changes (merge, split):")
            print(f"  back-end stopped: {_ms(r['pauses_s'])}")
            print(f"  write latency:    {_ms(r['latencies_s'])}")
            print(f"  requests: {r['requests']}, failed: {r['failed']}, "
                  f"image holds the last write: {r['image_ok']}")
            ok &= r["failed"] == 0 and r["image_ok"]
        if not args.no_metadata:
            backend = start_backend(Path(tmp), "meta", 64 * MIB)
            try:
                rows = metadata(backend.socket, tuple(args.patterns.split(",")))
            finally:
                backend.kill()
            print("KVM metadata with the disk attached (1 TiB device, 2 MiB blocks):")
            print(f"  {'pattern':<11} {'mode':<8} {'memslots':>8} {'memslot':>8} {'MiB':>9}")
            for row in rows:
                print(f"  {row['pattern']:<11} {row['mode']:<8} {row['memslots']:>8} "
                      f"{row['memslot_size'] // GIB:>6}G {row['mib']:>9.1f}")
            for pattern in args.patterns.split(","):
                d, e = (next(r["mib"] for r in rows if r["pattern"] == pattern and r["mode"] == m)
                        for m in ("dynamic", "exact"))
                print(f"  {pattern}: exact <= dynamic: {'yes' if e <= d * 1.01 else 'NO'}")
    return 0 if ok else 1
