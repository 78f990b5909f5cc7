"""A Linux guest under ``kvmmem run``, watched through its serial console and QMP.

The VMM runs as a subprocess with ``-serial stdio`` (read by a thread, line by
line) and a QMP socket (``qemu.qmp``'s synchronous client). The test kernel
(``make linux-guest``) prints, with ``kvmmem_monitor=<ms>`` on its command
line, a report whenever the memory it sees changes and once per period::

    kvmmem-guest: memtotal_kb=<N> online_blocks=<N> virtio_mem=<dev>:<plugged>/<requested>[,...]

Every wait here is on a report line or a QMP event, with a deadline; a guest
that panics or stops on an instruction KVM cannot emulate, a VMM that exits,
or a VM that QMP says is no longer running ends the wait at once with a
:class:`GuestFailed` that carries the guest's last serial lines and the
VMM's stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.qmp_client import ExecInterruptedError

ROOT = Path(__file__).resolve().parents[2]
KERNEL = ROOT / "build" / "linux" / "vmlinux"
CMDLINE = ROOT / "build" / "linux" / "cmdline"
MiB, GiB = 1 << 20, 1 << 30
MEMORY_BLOCK = 128 * MiB          # Linux's x86-64 memory block size for a guest this small

REPORT = re.compile(r"kvmmem-guest: memtotal_kb=(\d+) online_blocks=(\d+) virtio_mem=(\S*)")
PROBE = re.compile(r"virtio_mem (virtio\d+): (start address|region size|device block size|"
                   r"memory block size|subblock size|plugged size|requested size): (0x[0-9a-f]+)")
# Lines after which the guest will never report again.
FATAL = re.compile(r"Kernel panic|BUG: |general protection fault|Oops|invalid opcode")
TAIL = 40


class GuestFailed(AssertionError):
    """The guest or the VMM stopped, or a wait ran out; the message says why
    and shows the guest's last serial lines and the VMM's stderr."""


@dataclass(frozen=True)
class Report:
    """One ``kvmmem-guest:`` line: MemTotal, online memory blocks, and per
    virtio-mem device of the guest (``virtio0``...) its (plugged, requested)."""

    memtotal_kb: int
    online_blocks: int
    devices: dict[str, tuple[int, int]]
    at: float

    @classmethod
    def parse(cls, line: str, at: float) -> Report | None:
        m = REPORT.search(line)
        if m is None:
            return None
        devices = {}
        for entry in filter(None, m[3].split(",")):
            name, _, sizes = entry.partition(":")
            plugged, _, requested = sizes.partition("/")
            devices[name] = (int(plugged), int(requested))
        return cls(int(m[1]), int(m[2]), devices, at)


@dataclass
class Device:
    """A virtio-mem device for the command line."""

    id: str
    size: int
    requested: int = 0
    memslots: str = "dynamic"
    protect: str = "block"

    def options(self, index: int) -> list[str]:
        mem = f"mem{index}"
        return ["-object", f"memory-backend-ram,id={mem},size={self.size}",
                "-device", (f"virtio-mem,id={self.id},memdev={mem},requested-size={self.requested},"
                            f"memslots={self.memslots},protect={self.protect}")]


@dataclass
class LinuxGuest:
    """``kvmmem run`` with the test kernel; use as a context manager."""

    devices: Sequence[Device]
    ram: str = "256M"
    maxmem: str = "8G"
    kernel: Path = KERNEL
    extra_cmdline: str = ""
    drop_options: Sequence[str] = ()
    """Options of build/linux/cmdline to leave out (to make a guest fail)."""
    extra_options: Sequence[str] = ()
    """More ``kvmmem run`` options (``-incoming file:PATH``, say)."""
    lines: list[tuple[float, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._stderr: list[str] = []
        self._dir = tempfile.TemporaryDirectory(prefix="kvmmem-linux-")
        self.sock = os.path.join(self._dir.name, "qmp.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QEMUMonitorProtocol | None = None
        self.started = 0.0
        self._last_status_check = 0.0

    # -- starting and stopping ------------------------------------------------

    def command(self) -> list[str]:
        options = CMDLINE.read_text().split() if CMDLINE.exists() else []
        cmdline = " ".join(o for o in options if o not in self.drop_options)
        args = [sys.executable, "-m", "kvmmem", "run", "-m",
                f"{self.ram},maxmem={self.maxmem},slots={len(self.devices)}"]
        for index, dev in enumerate(self.devices):
            args += dev.options(index)
        return args + ["-kernel", str(self.kernel), "-serial", "stdio",
                       "-qmp", f"unix:{self.sock},server=on,wait=off",
                       "-append", f"{cmdline} {self.extra_cmdline}".strip(), *self.extra_options]

    def __enter__(self) -> Self:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=ROOT)
        threading.Thread(target=self._read, args=(self.proc.stdout, self._serial_line),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self._stderr_line),
                         daemon=True).start()
        self._connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):      # the VMM may be gone already
                self.qmp.cmd("quit")
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()

    def _connect(self) -> None:
        deadline = time.monotonic() + 60
        while not os.path.exists(self.sock):
            self._check_process()
            if time.monotonic() > deadline:
                self.fail("the VMM did not open its QMP socket within 60 s")
            with self._cond:
                self._cond.wait(0.1)          # woken early by output from the VMM
        self.qmp = QEMUMonitorProtocol(self.sock)
        self.qmp.settimeout(60)
        self.qmp.connect()

    def _read(self, stream: Any, sink: Callable[[str], None]) -> None:
        for raw in iter(stream.readline, b""):
            sink(raw.decode(errors="replace").rstrip("\r\n"))
        with self._cond:
            self._cond.notify_all()

    def _serial_line(self, line: str) -> None:
        with self._cond:
            self.lines.append((time.monotonic() - self.started, line))
            self._cond.notify_all()

    def _stderr_line(self, line: str) -> None:
        with self._cond:
            self._stderr.append(line)
            self._cond.notify_all()

    # -- failures ---------------------------------------------------------------

    def fail(self, why: str) -> None:
        with self._cond:
            tail = [f"  [{t:7.1f}] {line}" for t, line in self.lines[-TAIL:]]
            err = self._stderr[-TAIL:]
        code = self.proc.poll() if self.proc is not None else None
        raise GuestFailed("\n".join(
            [why, f"VMM exit status: {code}" if code is not None else "VMM still running",
             f"-- last {len(tail)} serial lines --", *tail,
             f"-- VMM stderr (last {len(err)} lines) --", *err]))

    def _lost(self, why: str) -> None:
        """QMP went away: give the VMM a moment to exit, so its status and
        last words are part of the failure."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.fail(why)

    def _check_process(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            self.fail(f"the VMM exited with status {self.proc.returncode}")

    def _check_guest(self, seen: int) -> None:
        """Fail at once if the VMM exited, the guest printed a fatal line, or
        QMP says the VM stopped (an internal error, say)."""
        self._check_process()
        with self._cond:
            fatal = next((line for _, line in self.lines[seen:] if FATAL.search(line)), None)
        if fatal is not None:
            self.fail(f"the guest failed: {fatal!r}")
        stopped = any(e["event"] in ("STOP", "SHUTDOWN", "GUEST_PANICKED") for e in self.events)
        now = time.monotonic()
        if stopped or now - self._last_status_check > 5:
            self._last_status_check = now
            status = self.cmd("query-status")
            if status.get("status") not in ("running", None):
                self.fail(f"the VM is no longer running: query-status says {status}")

    # -- QMP --------------------------------------------------------------------

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None
        try:
            return self.qmp.cmd(name, **args)
        except (ExecInterruptedError, EOFError, ConnectionError, TimeoutError,
                OSError) as exc:
            self._lost(f"QMP {name} failed: {exc!r}")

    def _pull_events(self, wait: float) -> None:
        assert self.qmp is not None
        try:
            event = self.qmp.pull_event(wait=wait)
        except TimeoutError:
            return
        except (EOFError, ConnectionError, OSError) as exc:
            self._lost(f"QMP connection lost: {exc!r}")
        if event is not None:
            self.events.append(event)
        self.events.extend(self.qmp.get_events(wait=False))

    def set_requested(self, dev_id: str, size: int) -> None:
        self.cmd("qom-set", path=f"/machine/peripheral/{dev_id}", property="requested-size",
                 value=size)

    def prop(self, dev_id: str, name: str) -> Any:
        return self.cmd("qom-get", path=f"/machine/peripheral/{dev_id}", property=name)

    # -- waiting ----------------------------------------------------------------

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """Wait until ``check()`` returns something truthy; between checks,
        wait for QMP events (the serial reader runs in its thread)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = max(0, len(self.lines) - TAIL)
        while True:
            result = check()
            if result:
                return result
            self._check_guest(seen)
            with self._cond:
                seen = len(self.lines)
            if time.monotonic() > deadline:
                self.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            self._pull_events(0.2)

    def reports(self, since: float = 0.0) -> list[Report]:
        with self._cond:
            lines = list(self.lines)
        return [r for t, line in lines if t >= since and (r := Report.parse(line, t)) is not None]

    def wait_report(self, what: str, pred: Callable[[Report], bool], since: float = 0.0,
                    timeout: float = 300) -> Report:
        """The first report (taken at or after ``since``, seconds from start)
        that satisfies ``pred``."""
        def check() -> Report | None:
            return next((r for r in self.reports(since) if pred(r)), None)
        report: Report = self.wait_for(what, check, timeout)
        return report

    def now(self) -> float:
        return time.monotonic() - self.started

    def probe_lines(self, since: float = 0.0) -> dict[str, dict[str, int]]:
        """What the driver printed first after ``since`` (its probe):
        {"virtio0": {"start address": ..., "plugged size": ...}}."""
        found: dict[str, dict[str, int]] = {}
        with self._cond:
            lines = [line for t, line in self.lines if t >= since]
        for line in lines:
            m = PROBE.search(line)
            if m:
                found.setdefault(m[1], {}).setdefault(m[2], int(m[3], 16))
        return found
