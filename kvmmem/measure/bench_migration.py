"""What a migration costs: a 1 TiB virtio-mem device with 1 GiB plugged,
the test guest writing its plugged memory (``kvmmem.hammer=1``) or, with
``--linux``, the Linux test kernel after its driver plugged the GiB,
migrated live to a file, then restored (issue 21's targets).

Each case runs in a child in its own memory cgroup (:mod:`kvmmem.measure.kmem`):
the source machine boots the guest, which plugs 1 GiB and hammers it; a
sampler thread reads the cgroup's kernel memory and the process's RSS every
5 ms while a :class:`~kvmmem.migration.precopy.MigrationJob` streams the
machine into /dev/null (what migrating costs by itself, as over a socket),
and again, the source resumed, into a file (whose page cache and file-system
bookkeeping the kernel charges to the cgroup too); then a second machine
loads the file
(``load_machine``, the restore until the vCPU could run). Reported: total
time, downtime, passes, stream size against the memory the guest touched,
the kernel memory and RSS the migration added at their peak, and the
restore time.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem import VirtioMemProps
from kvmmem.measure import kmem
from kvmmem.measure.bench_dirty_log import process_rss
from kvmmem.memory import HostMemory
from kvmmem.migration.machine_state import load_machine
from kvmmem.migration.precopy import MigrationJob
from kvmmem.migration.stream import StreamReader
from kvmmem.vmm.machine import Machine, MachineConfig

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
ROOT = Path(__file__).resolve().parents[2]
GUEST = ROOT / "build" / "guest" / "guest.elf"
ROUND = re.compile(rb"hammer round=(\d+)")


LINUX = ROOT / "build" / "linux" / "vmlinux"
LINUX_CMDLINE = ROOT / "build" / "linux" / "cmdline"
LINUX_RAM = 256 * MIB


def _machine(mode: str, device_size: int, plugged: int, guest: Path,
             output: list[bytes]) -> Machine:
    props = VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"),
                           requested_size=plugged, memslots=MemslotMode(mode))
    if guest == LINUX:                    # the Linux test kernel, as make test-linux boots it
        return Machine(MachineConfig(ram_size=LINUX_RAM, kernel=str(guest),
                                     maxmem=LINUX_RAM + device_size, slots=1,
                                     cmdline=LINUX_CMDLINE.read_text().strip(),
                                     memory_devices=[props], serial=output.append))
    return Machine(MachineConfig(ram_size=GIB, kernel=str(guest), maxmem=GIB + device_size,
                                 cmdline="kvmmem.hammer=1", memory_devices=[props],
                                 serial=output.append))


def _settled(machine: Machine, guest: Path, output: list[bytes], plugged: int) -> bool:
    """The test guest hammers; Linux has plugged its memory and reported it once more."""
    if guest != LINUX:
        return len(ROUND.findall(b"".join(output))) >= 2
    text = b"".join(output)
    return (machine.devices["vmem0"].plugged_size == plugged
            and text.count(f"virtio0:{plugged}/{plugged}".encode()) >= 2)


def _migrate(source: Machine, path: str, cgroup: kmem.MemCgroup) -> tuple[MigrationJob, int, int]:
    """One migration of ``source`` into ``path``; the job and the peaks of the
    kernel memory and RSS it added (sampled every 5 ms)."""
    kernel0, rss0 = cgroup.kernel_bytes(), process_rss()
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[0] = max(peaks[0], cgroup.kernel_bytes() - kernel0)
            peaks[1] = max(peaks[1], process_rss() - rss0)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out = open(path, "wb")                     # noqa: SIM115 - the job closes it
    job = MigrationJob(source, out, out.close)
    job.start()
    job.join(600)
    done.set()
    sampler.join()
    if job.status != "completed":
        raise RuntimeError(f"migration {job.status}: {job.error}")
    return job, peaks[0], peaks[1]


def migration_case(backend: kmem.KmemBackend, mode: str, device_size: int, plugged: int,
                   guest: Path, path: str) -> Iterator[dict[str, Any]]:
    """One migration and restore (see the module doc)."""
    cgroup = kmem.MemCgroup(backend.cgroup_dir_of(), backend)
    output: list[bytes] = []
    source = _machine(mode, device_size, plugged, guest, output)
    thread = threading.Thread(target=source.run)
    thread.start()
    deadline = time.monotonic() + 600
    while not _settled(source, guest, output, plugged):
        if time.monotonic() > deadline:
            raise RuntimeError("the guest did not plug and settle")
        time.sleep(0.05)
    time.sleep(0.2)
    # First into /dev/null: what migrating costs by itself (a live migration
    # over a socket); then into the file, whose page cache and file-system
    # bookkeeping the kernel charges too.
    _, kernel_null, rss_null = _migrate(source, "/dev/null", cgroup)
    source.resume()
    time.sleep(0.5)
    job, kernel_file, rss_file = _migrate(source, path, cgroup)
    source.shutdown(0)
    thread.join(30)
    dev = source.devices["vmem0"]
    result: dict[str, Any] = {
        "total_ms": job.total_ms, "downtime_ms": job.downtime_ms, "setup_ms": job.setup_ms,
        "passes": job.passes, "stream": os.path.getsize(path), "kernel_peak": kernel_null,
        "rss_peak": rss_null, "kernel_peak_file": kernel_file, "rss_peak_file": rss_file,
        "plugged": dev.plugged_size, "memslots": len(source.vm.memslots)}
    source.close()
    dev.memdev.close()                 # two 64 TiB mappings would not fit the address space
    target = _machine(mode, device_size, plugged, guest, [])
    t0 = time.monotonic()
    with open(path, "rb") as f:
        load_machine(target, StreamReader(f))
    result["restore_ms"] = (time.monotonic() - t0) * 1e3
    target.close()
    target.devices["vmem0"].memdev.close()
    yield result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="dynamic,exact")
    parser.add_argument("--device-sizes", default="1T,64T")
    parser.add_argument("--guest", type=Path, default=GUEST)
    parser.add_argument("--linux", action="store_true",
                        help="the Linux test kernel (make linux-guest), 256 MiB of boot RAM")
    args = parser.parse_args(argv)
    if args.linux:
        args.guest = LINUX
    backend = kmem.detect()
    print("live migration to a file, 1 GiB plugged, "
          + ("the Linux test kernel, 256 MiB boot RAM:" if args.linux
             else "test guest hammering it, 1 GiB boot RAM:"))
    print("  (kernel+ and RSS+: migrating into /dev/null; kernel+file: into the file)")
    print(f"  {'device':>6} {'mode':<8} {'total':>8} {'downtime':>9} {'passes':>6} "
          f"{'stream':>9} {'kernel+':>9} {'RSS+':>9} {'kernel+file':>11} {'restore':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for size_text in args.device_sizes.split(","):
            size = int(size_text[:-1]) << {"G": 30, "T": 40}[size_text[-1]]
            for mode in args.modes.split(","):
                r = kmem.measure(migration_case, backend, mode, size, GIB, args.guest,
                                 os.path.join(tmp, "stream"), backend=backend).result
                print(f"  {size_text:>6} {mode:<8} {r['total_ms']:>6.0f}ms {r['downtime_ms']:>7.1f}ms "
                      f"{r['passes']:>6} {r['stream'] / MIB:>7.1f}Mi "
                      f"{r['kernel_peak'] / MIB:>+7.2f}Mi {r['rss_peak'] / MIB:>+7.2f}Mi "
                      f"{r['kernel_peak_file'] / MIB:>+9.2f}Mi {r['restore_ms']:>6.0f}ms",
                      flush=True)
    return 0
