"""Soak: the VMM's RSS, file descriptors, threads and memslots stay flat.

Starts ``kvmmem run`` with the test guest (build/guest/guest.elf, ``make
guest``) and a QMP socket, then repeats a bounded loop of cycles, each:

- resize: ``qom-set requested-size`` to the larger of ``--sizes``, then
  back to the smaller (the guest plugs and unplugs, crossing a memslot
  boundary), each time waiting until ``query-memory-devices`` reports the
  size reached;
- every ``--reset-every`` cycles, ``system_reset`` (the guest reboots with
  everything unplugged and plugs the requested size again);
- ``--connects`` new QMP clients: greeting, negotiation, ``query-status``,
  disconnect;
- with ``--vhost-restart-every N``, the machine also has a vhost-user-blk
  disk served by qemu-storage-daemon (``-chardev ...,reconnect=1``), shown
  every memslot the resizes map and unmap; every N cycles the daemon is
  killed (the VMM sees it go) and started again on the same socket, and the
  cycle waits until the VMM has connected again
  (``x-query-memslot-consumers`` lists the back-end).

After each cycle it samples, from /proc/<pid>, the VMM's RSS, open file
descriptors and threads, and from ``x-query-memslots`` the KVM memslots of
the VM. Samples are taken at the same point of the cycle (the smaller size
reached), so the guest's plugged memory is the same in each; the first
``--warmup`` cycles are left out of the comparison. Prints a table and the
change from the first compared sample to the last; ``--json`` writes the
samples.

    .venv/bin/python scripts/soak.py --cycles 300 --reset-every 10 --connects 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kvmmem.measure.vhost_disk import Backend, start_backend
from kvmmem.units import parse_size

ROOT = Path(__file__).resolve().parents[2]

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 60.0
DEVICE = "/machine/peripheral/vmem0"
DISK = "vhost-user-blk:disk0"


class Qmp:
    """A blocking QMP client: replies by ``execute``, events kept aside."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        if "QMP" not in self._message():
            raise RuntimeError("no QMP greeting")
        self.execute("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise RuntimeError("the VMM closed the QMP connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())
        while True:
            message = self._message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise RuntimeError(f"{command}: {message['error']['desc']}")
            else:
                return message["return"]

    def wait_event(self, name: str) -> None:
        while not any(e["event"] == name for e in self.events):
            self.events.append(self._message())
        self.events.clear()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@dataclass
class Sample:
    cycle: int
    resets: int
    connects: int
    restarts: int
    rss_kib: int
    fds: int
    threads: int
    memslots: int
    seconds: float


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _wait_size(qmp: Qmp, size: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while qmp.execute("query-memory-devices")[0]["data"]["size"] != size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest did not reach {size} bytes")
        time.sleep(0.005)


def _connect_once(path: str) -> None:
    client = Qmp(path)
    if client.execute("query-status")["status"] != "running":
        raise RuntimeError("the machine is not running")
    client.close()


def _wait_backend(qmp: Qmp, connected: bool) -> None:
    """Until the disk's back-end is (or is no longer) a memslot consumer."""
    deadline = time.monotonic() + TIMEOUT
    while any(c["consumer"] == DISK for c in qmp.execute("x-query-memslot-consumers")) \
            != connected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the disk's back-end is still {'gone' if connected else 'there'}")
        time.sleep(0.01)


def soak(guest: Path, cycles: int, reset_every: int, connects: int,
         sizes: tuple[int, int] = (768 * MiB, 1280 * MiB),
         progress: Any = None, vhost_restart_every: int = 0) -> list[Sample]:
    """Run the loop against a fresh ``kvmmem run``; one sample per cycle."""
    with tempfile.TemporaryDirectory(prefix="kvmmem-soak-") as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        memory = ["-object", "memory-backend-ram,id=mem0,size=4G"]
        disk: Backend | None = None
        if vhost_restart_every:
            disk = start_backend(Path(tmp))
            memory = ["-object", "memory-backend-memfd,id=ram,size=512M",
                      "-machine", "memory-backend=ram",
                      "-object", "memory-backend-memfd,id=mem0,size=4G",
                      "-chardev", f"socket,id=c0,path={disk.socket},reconnect=1",
                      "-device", "vhost-user-blk,chardev=c0,id=disk0"]
        argv = [sys.executable, "-m", "kvmmem", "run", "-m", "512M,maxmem=8704M,slots=1", *memory,
                "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=0,memslots=dynamic",
                "-kernel", str(guest), "-serial", "none", "-qmp", f"unix:{sock},server=on,wait=off"]
        proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not os.path.exists(sock):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kvmmem run did not start (status {proc.poll()})")
                time.sleep(0.05)
            qmp = Qmp(sock)
            samples: list[Sample] = []
            resets = connected = restarts = 0
            start = time.monotonic()
            low, high = sizes
            for cycle in range(cycles):
                for size in (high, low):
                    qmp.execute("qom-set", path=DEVICE, property="requested-size", value=size)
                    _wait_size(qmp, size)
                if reset_every and cycle % reset_every == reset_every - 1:
                    qmp.execute("system_reset")
                    qmp.wait_event("RESET")          # all unplugged; the guest plugs again
                    _wait_size(qmp, low)
                    resets += 1
                for _ in range(connects):
                    _connect_once(sock)
                    connected += 1
                if disk is not None and cycle % vhost_restart_every == vhost_restart_every - 1:
                    disk.kill()
                    _wait_backend(qmp, False)
                    disk = start_backend(Path(tmp))
                    _wait_backend(qmp, True)
                    restarts += 1
                for _ in range(2):                   # the server has seen every client go
                    qmp.execute("query-status")
                memslots = len(qmp.execute("x-query-memslots"))
                status = _proc_status(proc.pid)
                samples.append(Sample(cycle, resets, connected, restarts,
                                      int(status["VmRSS"].split()[0]),
                                      len(os.listdir(f"/proc/{proc.pid}/fd")),
                                      int(status["Threads"]), memslots,
                                      round(time.monotonic() - start, 2)))
                if progress is not None:
                    progress(samples[-1])
            qmp.execute("quit")
            qmp.close()
            if proc.wait(TIMEOUT) != 0:
                raise RuntimeError(f"kvmmem run exited with {proc.returncode}")
            return samples
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if disk is not None:
                disk.kill()


def drift(samples: list[Sample], warmup: int) -> dict[str, int]:
    """Last compared sample minus the first (after ``warmup`` cycles)."""
    kept = samples[min(warmup, len(samples) - 1):]
    first, last = kept[0], kept[-1]
    return {name: getattr(last, name) - getattr(first, name)
            for name in ("rss_kib", "fds", "threads", "memslots")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=300)
    p.add_argument("--reset-every", type=int, default=10)
    p.add_argument("--connects", type=int, default=2, help="new QMP clients per cycle")
    p.add_argument("--vhost-restart-every", type=int, default=0,
                   help="add a vhost-user-blk disk and restart its back-end every N cycles")
    p.add_argument("--sizes", default="768M,1280M", help="the two requested sizes")
    p.add_argument("--warmup", type=int, default=10, help="cycles left out of the comparison")
    p.add_argument("--every", type=int, default=25, help="print every Nth sample")
    p.add_argument("--guest", type=Path, default=ROOT / "build" / "guest" / "guest.elf")
    p.add_argument("--json", type=Path, help="write the samples here")
    args = p.parse_args()
    low, high = (parse_size(s) for s in args.sizes.split(","))
    print(f"{'cycle':>6} {'resets':>6} {'connects':>8} {'restarts':>8} {'RSS MiB':>8} {'fds':>4} "
          f"{'threads':>7} {'memslots':>8} {'s':>7}")

    def show(s: Sample) -> None:
        if s.cycle % args.every == 0 or s.cycle == args.cycles - 1:
            print(f"{s.cycle:>6} {s.resets:>6} {s.connects:>8} {s.restarts:>8} "
                  f"{s.rss_kib / 1024:>8.1f} "
                  f"{s.fds:>4} {s.threads:>7} {s.memslots:>8} {s.seconds:>7.1f}", flush=True)

    samples = soak(args.guest, args.cycles, args.reset_every, args.connects, (low, high), show,
                   args.vhost_restart_every)
    change = drift(samples, args.warmup)
    print(f"from cycle {min(args.warmup, len(samples) - 1)} to {samples[-1].cycle}: "
          f"RSS {change['rss_kib']:+d} KiB, fds {change['fds']:+d}, "
          f"threads {change['threads']:+d}, memslots {change['memslots']:+d}")
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in samples], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
