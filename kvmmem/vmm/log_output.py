"""The VMM's log lines on stderr, without ever blocking the thread that logs.

A log call may come from the vCPU thread while it holds ``Machine.lock``
(a device reporting a protocol violation, say) or from the QMP thread. With
a plain ``StreamHandler`` a stderr pipe nobody reads blocks that thread in
``write``, and with it the machine and the monitor. :class:`StderrLog` puts
each formatted line into a bounded queue (``logging.handlers.QueueHandler``)
and a writer thread of its own writes them out. When stderr does not keep
up and the queue is full, lines are dropped and counted, and the count is
written once stderr takes lines again (and when the log is closed).
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading

from kvmmem.vmm.chardev import fd_writer

__all__ = ["CLOSE_TIMEOUT", "DEFAULT_CAPACITY", "StderrLog"]

DEFAULT_CAPACITY = 1024
"""Log lines held for a stderr that has not taken them yet."""
CLOSE_TIMEOUT = 1.0
"""Seconds :meth:`StderrLog.close` waits for stderr to take what is queued."""

_STOP = object()


class _DroppingQueueHandler(logging.handlers.QueueHandler):
    """A QueueHandler that never waits: a full queue costs the line, counted."""

    def __init__(self, lines: queue.Queue[object]) -> None:
        super().__init__(lines)
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        # Handler.handle() holds the handler's lock around emit: the count is safe,
        # and the lock is never held across I/O.
        try:
            line = self.format(record)
        except Exception:          # noqa: BLE001 - logging's own error path
            self.handleError(record)
            return
        try:
            self.queue.put_nowait(line)
        except queue.Full:
            self.dropped += 1


class StderrLog:
    """Log lines of ``logger`` (at ``level`` and above, the message alone, as
    Python's last-resort handler writes them) go to file descriptor ``fd``
    through a queue of ``capacity`` lines and a writer thread."""

    def __init__(self, logger: logging.Logger | None = None, fd: int = 2,
                 capacity: int = DEFAULT_CAPACITY, level: int = logging.WARNING) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity {capacity} must be positive")
        self.logger = logger or logging.getLogger("kvmmem")
        self._write = fd_writer(fd)
        self._lines: queue.Queue[object] = queue.Queue(capacity)
        self._handler = _DroppingQueueHandler(self._lines)
        self._handler.setLevel(level)
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._reported = 0
        self._thread = threading.Thread(target=self._write_out, name="log-output", daemon=True)
        self._thread.start()
        self.logger.addHandler(self._handler)

    @property
    def dropped(self) -> int:
        """Log lines lost because stderr did not keep up."""
        return self._handler.dropped

    def _write_out(self) -> None:
        while True:
            line = self._lines.get()
            if line is _STOP:
                self._report_drops()
                return
            assert isinstance(line, str)
            try:
                self._write(line.encode(errors="replace") + b"\n")
            except OSError:                      # stderr is gone (EPIPE): nothing to tell
                self._handler.acquire()
                try:
                    self._handler.dropped += 1
                finally:
                    self._handler.release()
                continue
            self._report_drops()

    def _report_drops(self) -> None:
        new = self._handler.dropped - self._reported
        if new <= 0:
            return
        self._reported += new
        try:
            self._write(f"kvmmem: {new} log lines dropped (stderr did not keep up; "
                        f"{self._reported} in all)\n".encode())
        except OSError:
            pass

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop taking lines, write out what is queued (waiting at most
        ``timeout`` seconds for stderr), then the count of dropped lines. A
        writer still blocked on stderr is left behind (a daemon thread)."""
        self.logger.removeHandler(self._handler)
        try:
            self._lines.put(_STOP, timeout=timeout)
        except queue.Full:
            return                               # stderr is stuck: nothing more can go
        self._thread.join(timeout)
