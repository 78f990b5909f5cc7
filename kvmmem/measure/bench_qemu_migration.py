"""QEMU 10's live migration of the Linux test kernel, to set beside kvmmem's
(``scripts/bench_migration.py --linux``): the same guest (build/linux/vmlinux,
256 MiB of boot RAM, a 1 TiB virtio-mem device whose driver plugged 1 GiB),
migrated live to a file, then restored from it.

Each case starts QEMU in its own memory cgroup (:mod:`kvmmem.measure.kmem`)
with ``virtio-mem-pci,...,requested-size=1G,dynamic-memslots=on`` (``--all``:
also ``off``), waits until the guest's once-a-second monitor line
(``kvmmem_monitor=1000``) has shown the GiB plugged twice, sleeps 0.2 s, and
then migrates, as bench_migration does for kvmmem, first into nothing (what
migrating costs by itself: ``migrate uri=unix:PATH`` to a socket that this
script reads and discards, since QEMU's ``file:`` fails on /dev/null: it
truncates the file) and, after ``cont`` and 0.5 s,
into the file (``migrate uri=file:PATH``), polling ``query-migrate`` until it
completes while a thread samples the cgroup's kernel memory and QEMU's RSS
(``/proc/PID/status``) every 5 ms. Reported per case: total time, downtime
and setup time as ``query-migrate`` gives them for the file migration,
``dirty-sync-count`` (passes), the file's size, the peaks of kernel memory
and RSS over their values right before each migration, and QEMU's kernel
memory with the GiB plugged, before migrating.

QEMU throttles a migration to 128 MiB/s (``max-bandwidth``) by default;
kvmmem does not, so the script sets ``max-bandwidth`` to 64 GiB/s (in effect
no limit) on the source before migrating (``--max-bandwidth qemu`` keeps the
default: 0.38-0.51 s instead of 0.21-0.28 s for this guest, measured with
the two cores shared).

Restore: a second QEMU with the same command line and ``-incoming defer``, in
a cgroup of its own, gets ``migrate-set-capabilities events=on`` and
``migrate-incoming uri=file:PATH`` once its QMP socket answers. Two times are
reported, both from QEMU's own event timestamps (microseconds, wall clock):

* ``load``: from the incoming ``MIGRATION`` event ``setup`` to the one that
  says ``completed``, i.e. reading the stream into an already built machine;
  the nearest match to kvmmem's restore figure (``load_machine`` into a built
  machine, no process start);
* ``launch->run``: from just before the process is started (``Popen``) to
  its ``RESUME`` event (the guest running), i.e. process start, machine
  construction, the QMP handshake (two round trips) and the load.

QEMU 10 is not a dependency of kvmmem and nothing in the tests needs it: the
script looks for it at ``--qemu PATH`` (default
``/opt/qemu10/usr/bin/qemu-system-x86_64``) and exits 2 with one line if it
is not there. Debian 12's own qemu-utils/qemu-system-common 7.2 (which the
vhost tests use) stay installed and untouched: QEMU 10 comes from
bookworm-backports and is only unpacked into a private prefix::

    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
    Types: deb
    URIs: http://deb.debian.org/debian
    Suites: bookworm-backports
    Components: main
    Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
    EOF
    apt-get update
    mkdir -p /opt/qemu10/debs && cd /opt/qemu10/debs
    apt-get download -t bookworm-backports qemu-system-x86 qemu-system-common \\
        qemu-system-data seabios ipxe-qemu
    # shared libraries that Debian 12's base system lacks (from bookworm):
    apt-get download libcapstone4 libpmem1 libfdt1 libslirp0 libvdeplug2 \\
        libndctl6 libdaxctl1
    for d in *.deb; do dpkg -x "$d" /opt/qemu10; done
    LD_LIBRARY_PATH=/opt/qemu10/usr/lib/x86_64-linux-gnu \\
        /opt/qemu10/usr/bin/qemu-system-x86_64 --version   # QEMU emulator version 10.0.2
    qemu-storage-daemon --version                         # still 7.2.x; dpkg -l unchanged

(``apt-get download`` into a directory that user ``_apt`` cannot read prints
a harmless "Download is performed unsandboxed as root" warning.) This module
runs QEMU with ``LD_LIBRARY_PATH=<prefix>/usr/lib/x86_64-linux-gnu`` and
firmware from ``-L <prefix>/usr/share/seabios -L <prefix>/usr/share/qemu``,
where ``<prefix>`` is the ``--qemu`` path less ``usr/bin/NAME``.

The guest's command line is build/linux/cmdline without any
``virtio_mmio.device=`` entry (the device here is virtio-mem-pci) and with
``console=ttyS0`` (kvmmem adds that itself). ``-machine pc`` (SeaBIOS, whose
PIR table routes the PCI interrupt without ACPI) and ``-cpu host`` boot it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kvmmem.measure import kmem
from kvmmem.measure.bench_dirty_log import process_rss
from kvmmem.measure.soak import Qmp

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40
ROOT = Path(__file__).resolve().parents[2]
LINUX = ROOT / "build" / "linux" / "vmlinux"
LINUX_CMDLINE = ROOT / "build" / "linux" / "cmdline"
LINUX_RAM = 256 * MIB
QEMU10 = Path("/opt/qemu10/usr/bin/qemu-system-x86_64")
SETTLE_TIMEOUT_S = 600.0
MIGRATE_TIMEOUT_S = 600.0
SAMPLE_S = 0.005
# QEMU throttles a migration to 128 MiB/s unless told otherwise; kvmmem does
# not throttle, so by default the comparison lifts the limit.
UNTHROTTLED = 64 * GIB
SIZE = re.compile(r"(\d+)([GT])")


def guest_cmdline(text: str) -> str:
    """The test kernel's command line for QEMU: kvmmem's virtio-mmio devices
    dropped, ``console=ttyS0`` added if missing."""
    words = [w for w in text.split() if not w.startswith("virtio_mmio.device=")]
    if not any(w.startswith("console=") for w in words):
        words.append("console=ttyS0")
    return " ".join(words)


def qemu_env(qemu: Path) -> dict[str, str]:
    """The environment for a QEMU unpacked under ``<prefix>/usr/bin``: its
    private shared libraries first."""
    env = dict(os.environ)
    libdir = qemu.resolve().parents[1] / "lib" / "x86_64-linux-gnu"
    if libdir.is_dir():
        env["LD_LIBRARY_PATH"] = ":".join(p for p in (str(libdir), env.get("LD_LIBRARY_PATH")) if p)
    return env


def qemu_command(qemu: Path, dynamic: bool, device_size: int, plugged: int, serial: str,
                 qmp: str, cpu: str = "host", incoming: bool = False,
                 cmdline: str | None = None) -> list[str]:
    """The QEMU command line for the test kernel with one virtio-mem device
    (``cmdline``: the kernel's, build/linux/cmdline when not given)."""
    if cmdline is None:
        cmdline = LINUX_CMDLINE.read_text()
    share = qemu.resolve().parents[1] / "share"
    firmware = [arg for d in (share / "seabios", share / "qemu") if d.is_dir() for arg in ("-L", str(d))]
    cmd = [str(qemu), *firmware, "-enable-kvm", "-machine", "pc", "-cpu", cpu,
           "-m", f"{LINUX_RAM // MIB}M,maxmem={(LINUX_RAM + device_size) // MIB}M,slots=1",
           "-object", f"memory-backend-ram,id=mem0,size={device_size // MIB}M,reserve=off",
           "-device", f"virtio-mem-pci,id=vmem0,memdev=mem0,requested-size={plugged // MIB}M,"
                      f"dynamic-memslots={'on' if dynamic else 'off'}",
           "-kernel", str(LINUX), "-append", guest_cmdline(cmdline),
           "-serial", f"file:{serial}", "-qmp", f"unix:{qmp},server=on,wait=off",
           "-display", "none", "-nodefaults"]
    if incoming:
        cmd += ["-incoming", "defer"]
    return cmd


class Qemu:
    """One QEMU process in a fresh memory cgroup, with a QMP connection."""

    def __init__(self, cmd: list[str], env: dict[str, str], qmp_path: str,
                 backend: kmem.KmemBackend) -> None:
        self.cgroup = backend.create()
        self.launched = time.time()
        try:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE,
                                         preexec_fn=lambda: self.cgroup.add(os.getpid()))
        except BaseException:
            self.cgroup.remove()
            raise
        self.pid = self.proc.pid
        try:
            self.qmp = self._connect(qmp_path)
        except BaseException:
            self.close()
            raise

    def _connect(self, qmp_path: str) -> Qmp:
        """QEMU binds its QMP socket before it listens: retry until it answers."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return Qmp(qmp_path)
            except (FileNotFoundError, ConnectionRefusedError):
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU's QMP socket {qmp_path} did not answer within 60 s") from None
                time.sleep(0.001)

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace").strip() if self.proc.stderr else ""
            raise RuntimeError(f"QEMU exited with {self.proc.returncode}: {err[-400:]}")

    def close(self) -> None:
        if hasattr(self, "qmp"):
            self.qmp.close()
        self.proc.kill()
        self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.cgroup.remove()


@contextmanager
def running_qemu(cmd: list[str], env: dict[str, str], qmp_path: str,
                 backend: kmem.KmemBackend) -> Iterator[Qemu]:
    qemu = Qemu(cmd, env, qmp_path, backend)
    try:
        yield qemu
    finally:
        qemu.close()


def _settled(serial: str, plugged: int) -> bool:
    """The driver has plugged the size and the monitor line said so twice."""
    try:
        text = Path(serial).read_bytes()
    except OSError:
        return False
    return text.count(f"virtio0:{plugged}/{plugged}".encode()) >= 2


@contextmanager
def draining_socket(path: str) -> Iterator[list[int]]:
    """A Unix socket at ``path`` whose one connection is read to its end and
    thrown away (the list yielded gets the byte count): a migration target
    that costs the source nothing but the socket. QEMU's ``file:`` cannot
    take /dev/null (it truncates the file and fails)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    count = [0]

    def drain() -> None:
        conn, _ = server.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                count[0] += len(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        thread.join(MIGRATE_TIMEOUT_S)
        server.close()
        os.unlink(path)


def _migrate(qemu: Qemu, uri: str) -> tuple[dict[str, Any], int, int]:
    """One migration of ``qemu`` to ``uri``; ``query-migrate``'s final
    answer and the peaks of the kernel memory and RSS it added (sampled every
    5 ms)."""
    kernel0, rss0 = qemu.cgroup.kernel_bytes(), process_rss(qemu.pid)
    peaks = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks[0] = max(peaks[0], qemu.cgroup.kernel_bytes() - kernel0)
            peaks[1] = max(peaks[1], process_rss(qemu.pid) - rss0)
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        qemu.qmp.execute("migrate", uri=uri)
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while True:
            info: dict[str, Any] = qemu.qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"migration still {info.get('status')} after {MIGRATE_TIMEOUT_S:.0f} s")
            time.sleep(SAMPLE_S)
    finally:
        done.set()
        sampler.join()
    if info["status"] != "completed":
        raise RuntimeError(f"migration {info['status']}: {info.get('error-desc', '')}")
    return info, peaks[0], peaks[1]


def _event_time(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def _restore(cmd: list[str], env: dict[str, str], qmp_path: str, path: str,
             backend: kmem.KmemBackend) -> dict[str, Any]:
    """Load ``path`` into a fresh QEMU (``-incoming defer``); its times."""
    with running_qemu(cmd, env, qmp_path, backend) as target:
        qmp = target.qmp
        qmp.execute("migrate-set-capabilities",
                    capabilities=[{"capability": "events", "state": True}])
        qmp.execute("migrate-incoming", uri=f"file:{path}")
        deadline = time.monotonic() + MIGRATE_TIMEOUT_S
        while qmp.execute("query-status")["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the restored guest is not running")
            target._check_alive()
            time.sleep(0.001)
        time.sleep(0.05)
        qmp.execute("query-status")                    # collects events still on the way
        events = qmp.events
        status = {e["data"]["status"]: _event_time(e) for e in events if e["event"] == "MIGRATION"}
        resumed = [_event_time(e) for e in events if e["event"] == "RESUME"]
        if "completed" not in status or not resumed:
            raise RuntimeError(f"incoming migration events missing: {[e['event'] for e in events]}")
        start = status.get("setup", status.get("active", target.launched))
        return {"load_ms": (status["completed"] - start) * 1e3,
                "launch_run_ms": (resumed[0] - target.launched) * 1e3,
                "restore_kernel": target.cgroup.kernel_bytes()}


def migration_case(qemu: Path, backend: kmem.KmemBackend, dynamic: bool, device_size: int,
                   plugged: int, tmp: str, cpu: str = "host",
                   max_bandwidth: int | None = UNTHROTTLED) -> dict[str, Any]:
    """One migration and restore of the Linux test kernel under QEMU (see
    the module doc)."""
    env = qemu_env(qemu)
    serial, qmp_path, stream = (os.path.join(tmp, n) for n in ("serial.log", "qmp.sock", "stream"))
    for leftover in (serial, qmp_path, stream):
        if os.path.exists(leftover):
            os.unlink(leftover)
    cmd = qemu_command(qemu, dynamic, device_size, plugged, serial, qmp_path, cpu)
    with running_qemu(cmd, env, qmp_path, backend) as source:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not _settled(serial, plugged):
            source._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the guest did not plug {plugged // MIB} MiB within "
                                   f"{SETTLE_TIMEOUT_S:.0f} s (serial log: {serial})")
            time.sleep(0.05)
        boot_s = time.time() - source.launched
        time.sleep(0.2)
        kernel_before = source.cgroup.kernel_bytes()
        if max_bandwidth is not None:
            source.qmp.execute("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
        params = source.qmp.execute("query-migrate-parameters")
        sink = os.path.join(tmp, "sink.sock")
        with draining_socket(sink):
            _, kernel_null, rss_null = _migrate(source, f"unix:{sink}")
        source.qmp.execute("cont")
        time.sleep(0.5)
        info, kernel_file, rss_file = _migrate(source, f"file:{stream}")
    ram = info.get("ram", {})
    result: dict[str, Any] = {
        "total_ms": float(info["total-time"]), "downtime_ms": float(info.get("downtime", 0)),
        "setup_ms": float(info.get("setup-time", 0)), "passes": int(ram.get("dirty-sync-count", 0)),
        "stream": os.path.getsize(stream), "kernel_peak": kernel_null, "rss_peak": rss_null,
        "kernel_peak_file": kernel_file, "rss_peak_file": rss_file, "kernel_before": kernel_before,
        "boot_s": boot_s, "max_bandwidth": params.get("max-bandwidth"),
        "downtime_limit": params.get("downtime-limit")}
    if os.path.exists(qmp_path):                      # a killed QEMU leaves its socket
        os.unlink(qmp_path)
    result.update(_restore(cmd + ["-incoming", "defer"], env, qmp_path, stream, backend))
    return result


def qemu_version(qemu: Path) -> str:
    out = subprocess.run([str(qemu), "--version"], env=qemu_env(qemu), capture_output=True,
                         text=True, check=False)
    first = (out.stdout or out.stderr).split("\n")[0]
    return first.split("version")[-1].strip() if "version" in first else first


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qemu", type=Path, default=QEMU10,
                        help=f"QEMU 10's qemu-system-x86_64 (default {QEMU10}; see the module doc)")
    parser.add_argument("--all", action="store_true",
                        help="also dynamic-memslots=off (about 2.5 GiB of kernel memory for 1 TiB)")
    parser.add_argument("--device-sizes", default="1T", help="comma-separated, e.g. 1T,4T (default 1T)")
    parser.add_argument("--cpu", default="host", help="QEMU's -cpu (default host)")
    parser.add_argument("--max-bandwidth", default="64G",
                        help="migrate-set-parameters max-bandwidth in bytes/s, with a G or M suffix "
                             "allowed; 'qemu' keeps QEMU's default (128 MiB/s). Default 64G: unthrottled, "
                             "as kvmmem migrates")
    args = parser.parse_args(argv)
    if not (args.qemu.is_file() and os.access(args.qemu, os.X_OK)):
        print(f"QEMU 10 not found at {args.qemu}: see the recipe in "
              f"kvmmem/measure/bench_qemu_migration.py's docstring, or pass --qemu PATH")
        return 2
    if not LINUX.exists():
        print(f"the Linux test kernel is missing: {LINUX} (make linux-guest)")
        return 2
    bandwidth: int | None = None
    if args.max_bandwidth != "qemu":
        match = re.fullmatch(r"(\d+)([GM]?)", args.max_bandwidth)
        if match is None:
            parser.error(f"bad --max-bandwidth {args.max_bandwidth!r}")
        bandwidth = int(match.group(1)) << {"G": 30, "M": 20, "": 0}[match.group(2)]
    backend = kmem.detect()
    print(f"QEMU {qemu_version(args.qemu)}: live migration to a file, 1 GiB plugged, "
          "the Linux test kernel, 256 MiB boot RAM:")
    print("  (kernel+ and RSS+: migrating into a Unix socket read into nothing; kernel+file, RSS+file: into the file;\n"
          "   total, downtime, setup, passes: query-migrate of the migration into the file;\n"
          "   restore: load = incoming MIGRATION event setup -> completed; launch->run = Popen -> RESUME;\n"
          "   kernel: QEMU's kernel memory with the GiB plugged, before migrating)")
    print(f"  {'device':>6} {'mode':<8} {'total':>8} {'downtime':>9} {'passes':>6} "
          f"{'stream':>9} {'kernel+':>9} {'RSS+':>9} {'kernel+file':>11} {'restore':>8} "
          f"{'RSS+file':>9} {'setup':>7} {'launch->run':>11} {'kernel':>9}")
    modes = [True, False] if args.all else [True]
    with tempfile.TemporaryDirectory() as tmp:
        for size_text in args.device_sizes.split(","):
            match = SIZE.fullmatch(size_text)
            if match is None:
                parser.error(f"bad device size {size_text!r} (use e.g. 1T or 512G)")
            size = int(match.group(1)) << {"G": 30, "T": 40}[match.group(2)]
            for dynamic in modes:
                r = migration_case(args.qemu, backend, dynamic, size, GIB, tmp, args.cpu, bandwidth)
                mode = "dyn=on" if dynamic else "dyn=off"
                print(f"  {size_text:>6} {mode:<8} {r['total_ms']:>6.0f}ms {r['downtime_ms']:>7.1f}ms "
                      f"{r['passes']:>6} {r['stream'] / MIB:>7.1f}Mi "
                      f"{r['kernel_peak'] / MIB:>+7.2f}Mi {r['rss_peak'] / MIB:>+7.2f}Mi "
                      f"{r['kernel_peak_file'] / MIB:>+9.2f}Mi {r['load_ms']:>6.0f}ms "
                      f"{r['rss_peak_file'] / MIB:>+7.2f}Mi {r['setup_ms']:>5.0f}ms "
                      f"{r['launch_run_ms']:>9.0f}ms {r['kernel_before'] / MIB:>7.1f}Mi",
                      flush=True)
                print(f"         (booted and plugged in {r['boot_s']:.0f} s; max-bandwidth "
                      f"{r['max_bandwidth']} B/s, downtime-limit {r['downtime_limit']} ms; restored "
                      f"QEMU's kernel memory {r['restore_kernel'] / MIB:.1f} MiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
