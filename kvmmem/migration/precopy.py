"""Live migration (pre-copy) of a running machine into a stream, as QEMU's
``migration_thread`` does it, with the dirty log of :mod:`kvmmem.memory.dirty_log`.

A :class:`MigrationJob` runs in a thread of its own:

1. *setup*: blockers checked; every virtio-mem device stops taking plug
   requests (BUSY, QEMU's ``virtio_mem_is_busy``), so its plug state and
   memslots stay as they are sent; dirty logging starts on every memslot, and
   the VMM's own writes to guest memory (rings, responses) are marked too;
   the configuration and the virtio-mem states go first;
2. *active*: boot RAM and every plugged block are sent once without zero
   pages while the guest runs; then, pass after pass, the pages written
   meanwhile, until what is left would take less than ``downtime-limit`` at
   the bandwidth measured (or after ``MAX_PASSES``);
3. the vCPU is stopped (the *downtime* starts), the last dirty pages and the
   device states are sent, END; the source stays stopped (*completed*).

A failure or ``cancel()`` stops logging, lets plugging go on and runs the
vCPU again if the job stopped it: the source stays usable (*failed*,
*cancelled*). Every status change is passed to ``on_status`` (QMP's
MIGRATION event).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from kvmmem.memory.dirty_log import DirtyLog
from kvmmem.migration.machine_state import (
    MigrationError,
    ram_ranges,
    send_range,
    write_head,
    write_tail,
)
from kvmmem.migration.stream import StreamWriter
from kvmmem.vmm.machine import Machine

__all__ = ["MAX_PASSES", "MigrationCancelled", "MigrationJob"]

log = logging.getLogger(__name__)

MAX_PASSES = 30
DEFAULT_DOWNTIME_LIMIT_MS = 300     # QEMU's default downtime-limit


class MigrationCancelled(Exception):
    pass


class MigrationJob:
    """One outgoing migration of ``machine`` into ``out`` (closed by ``close``)."""

    def __init__(self, machine: Machine, out: IO[bytes], close: Callable[[], None],
                 on_status: Callable[[str], None] = lambda status: None,
                 downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS,
                 max_bandwidth: int = 0) -> None:
        self.machine = machine
        self.status = "none"
        self.error: str | None = None
        self.downtime_limit_ms = downtime_limit_ms
        self.max_bandwidth = max_bandwidth          # bytes a second; 0: no limit
        self.passes = 0
        self.remaining = 0
        self.total = 0
        self.dirty_rate = 0.0                       # pages a second in the last pass
        self.setup_ms = 0.0
        self.downtime_ms = 0.0
        self.total_ms = 0.0
        self._out, self._close, self._on_status = out, close, on_status
        self._writer: StreamWriter | None = None
        self._cancel = threading.Event()
        self._abort: str | None = None
        self._thread = threading.Thread(target=self._run, name="migration", daemon=True)

    @property
    def transferred(self) -> int:
        return self._writer.transferred if self._writer is not None else 0

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def start(self) -> None:
        self._set("setup")
        self._thread.start()

    def cancel(self) -> None:
        if not self.finished:
            self._cancel.set()
            self._set("cancelling")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _set(self, status: str) -> None:
        self.status = status
        self._on_status(status)

    def _check(self) -> None:
        if self._abort is not None:
            raise MigrationError(self._abort)
        if self._cancel.is_set():
            raise MigrationCancelled

    def _machine_reset(self, resets: int) -> None:
        """A reset unplugs every block after the plug state went out: the
        destination could not have the guest's memory. Fail at once, so that
        the rebooted guest's plug requests are not answered BUSY for long."""
        self._abort = ("the machine was reset during the migration, so its memory devices "
                       "are not as they were sent")

    # -- the migration thread -----------------------------------------------------

    def _run(self) -> None:
        machine = self.machine
        started = time.monotonic()
        dirty = DirtyLog()
        stopped_here = False
        logging_on = False
        try:
            machine.reset_notifiers.add(self._machine_reset)
            with machine.lock:
                writer = self._writer = StreamWriter(self._out)
                for dev in machine.devices.values():
                    dev.migrating = True
                write_head(machine, writer)
                machine.memory.kvm_listener.start_dirty_log(dirty)
                logging_on = True
                machine.guest_memory.on_write = dirty.mark
                ranges = ram_ranges(machine)
                resets = machine.resets
                early = {dev.id: dev.save_state() for dev in machine.devices.values()}
            self.setup_ms = (time.monotonic() - started) * 1e3
            self._set("active")
            self.total = sum(size for _, _, size in ranges)
            self.remaining = self.total
            t0 = time.monotonic()
            pace = functools.partial(self._throttle, t0)
            for host, offset, size in ranges:               # the first pass
                send_range(writer, host, offset, size, each_chunk=pace)
                self.remaining -= size
            bandwidth = self.transferred / max(time.monotonic() - t0, 1e-6)
            while True:
                self._check()
                self.passes += 1
                t0 = time.monotonic()
                with machine.lock:
                    machine.memory.kvm_listener.sync_dirty_log()
                runs = dirty.take()
                size = sum(s for _, _, s in runs)
                self.remaining = size
                self.dirty_rate = size / 4096 / max(time.monotonic() - t0, 1e-3)
                if size <= bandwidth * self.downtime_limit_ms / 1e3 or self.passes >= MAX_PASSES:
                    for host, offset, length in runs:        # sent in the downtime below
                        dirty.mark(host, offset, length)
                    break
                sent_before = self.transferred
                pace = functools.partial(self._throttle, t0)
                for host, offset, length in runs:
                    send_range(writer, host, offset, length, skip_zero=False, each_chunk=pace)
                bandwidth = (self.transferred - sent_before) / max(time.monotonic() - t0, 1e-6)
            self._check()
            down = time.monotonic()
            machine.pause()
            stopped_here = True
            with machine.lock:
                # The plug state went out first; a reset (which unplugs
                # everything) or anything else that changed it since would
                # leave the destination with other memory than the guest's.
                self._check()
                if machine.resets != resets or early != {
                        dev.id: dev.save_state() for dev in machine.devices.values()}:
                    raise MigrationError("the machine was reset during the migration, so its "
                                         "memory devices are not as they were sent")
                machine.memory.kvm_listener.sync_dirty_log()
                for host, offset, length in dirty.take():
                    send_range(writer, host, offset, length, skip_zero=False)
                # (the MSRs are probed here, with the vCPU stopped: from another
                # thread KVM_GET_MSRS waits for the vCPU to leave KVM_RUN, which
                # an idle guest may not do for half a second)
                write_tail(machine, writer)
                self._finish_logging(logging_on)
                logging_on = False
            self.downtime_ms = (time.monotonic() - down) * 1e3
            self.remaining = 0
            self.total_ms = (time.monotonic() - started) * 1e3
            self._close()
            self._set("completed")        # the source stays stopped (QEMU's postmigrate)
        except BaseException as exc:
            cancelled = isinstance(exc, MigrationCancelled)
            self.error = None if cancelled else str(exc) or type(exc).__name__
            if not cancelled:
                log.error("migration failed: %s", self.error)
            with machine.lock:
                self._finish_logging(logging_on)
            try:
                self._close()
            except OSError:
                pass
            if stopped_here:
                machine.resume()
            self.total_ms = (time.monotonic() - started) * 1e3
            self._set("cancelled" if cancelled else "failed")

    def _finish_logging(self, logging_on: bool) -> None:
        machine = self.machine
        if self._machine_reset in machine.reset_notifiers:
            machine.reset_notifiers.remove(self._machine_reset)
        if logging_on:
            machine.memory.kvm_listener.stop_dirty_log()
        machine.guest_memory.on_write = None
        for dev in machine.devices.values():
            dev.migrating = False

    def _throttle(self, t0: float) -> None:
        """Check for a cancel or an abort, and keep the average since ``t0``
        under ``max_bandwidth`` (QEMU's max-bandwidth)."""
        self._check()
        if self.max_bandwidth:
            ahead = self.transferred / self.max_bandwidth - (time.monotonic() - t0)
            while ahead > 0:
                self._check()
                time.sleep(min(ahead, 0.05))
                ahead = self.transferred / self.max_bandwidth - (time.monotonic() - t0)

    def info(self) -> dict[str, Any]:
        """``query-migrate``'s reply, in QEMU's names."""
        result: dict[str, Any] = {"status": self.status}
        if self.status == "none":
            return result
        result["setup-time"] = round(self.setup_ms)
        result["total-time"] = round(self.total_ms)
        result["ram"] = {"transferred": self.transferred, "remaining": self.remaining,
                         "total": self.total, "dirty-sync-count": self.passes,
                         "dirty-pages-rate": round(self.dirty_rate)}
        if self.status == "completed":
            result["downtime"] = round(self.downtime_ms)
        if self.error is not None:
            result["error-desc"] = self.error
        return result
