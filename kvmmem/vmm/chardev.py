"""Guest output that can never block the VMM: a bounded buffer and a writer thread.

The UART hands every byte the guest writes to a sink while the vCPU thread
holds ``Machine.lock``. A sink that does I/O (``-serial stdio`` into a pipe
nobody drains, a slow terminal, a full disk) must not stall that thread,
or the QMP server waits on the lock and the machine cannot even be quit.
:class:`BufferedOutput` takes the bytes into a bounded buffer at once; its
own thread writes them out. When the sink does not keep up and the buffer
is full, guest output is dropped and counted (``dropped``), and the count is
logged when the sink makes progress again and when the output is closed.
QEMU's 16550 instead holds the guest off by leaving its transmit register
full (hw/char/serial.c, ``serial_xmit``); kvmmem's UART is a polled
console that is always ready, so it drops, as a full console ring would.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 256 << 10
"""Bytes of guest output held for a sink that has not taken them yet."""
CLOSE_TIMEOUT = 1.0
"""Seconds :meth:`BufferedOutput.close` waits for a slow sink before it drops the rest."""


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """A sink that writes everything to ``fd``, waiting (in the writer thread)
    as long as it takes, also when someone made the descriptor non-blocking."""
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                select.select([], [fd], [])
    return write


class BufferedOutput:
    """A sink (``output(data)``) that never blocks: bytes go to ``sink`` from
    a writer thread, at most ``capacity`` of them waiting."""

    def __init__(self, sink: Callable[[bytes], None], name: str = "serial",
                 capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity {capacity} must be positive")
        self.sink = sink
        self.name = name
        self.capacity = capacity
        self.dropped = 0
        """Bytes of guest output lost: the buffer was full or the sink failed."""
        self.written = 0
        self._buffer = bytearray()
        self._busy = False               # the writer holds bytes taken from the buffer
        self._closing = False
        self._failed: str | None = None  # the sink raised: everything after is dropped
        self._reported = 0               # dropped bytes already logged
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._write_out, name=f"{name}-output",
                                        daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Bytes waiting in the buffer."""
        return len(self._buffer)

    def __call__(self, data: bytes) -> None:
        """Take ``data`` (any thread): buffered, or dropped and counted, never waited on."""
        with self._cond:
            room = 0 if self._failed or self._closing else self.capacity - len(self._buffer)
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            if data:
                self._buffer += data
                self._cond.notify()

    def _write_out(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._buffer and not self._closing:
                    self._cond.wait()
                if not self._buffer:
                    return
                chunk, self._buffer = bytes(self._buffer), bytearray()
                self._busy = True
            try:
                self.sink(chunk)
            except Exception as exc:         # noqa: BLE001 - the guest must not notice
                with self._cond:
                    self._failed = f"{type(exc).__name__}: {exc}"
                    self.dropped += len(chunk) + len(self._buffer)
                    self._buffer.clear()
                log.warning("%s: the output failed (%s); guest output is dropped from now on",
                            self.name, self._failed)
                continue
            self.written += len(chunk)
            self._report_drops()

    def _report_drops(self) -> None:
        with self._cond:
            new, self._reported = self.dropped - self._reported, self.dropped
        if new:
            log.warning("%s: %d bytes of guest output dropped (the output did not keep up; "
                        "%d dropped in all)", self.name, new, self.dropped)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the sink took everything; False if ``timeout`` ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._buffer and not self._busy, timeout)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write out what is buffered (waiting at most ``timeout`` seconds for
        the sink), then stop: later output is dropped. A writer still blocked
        in the sink is left behind (a daemon thread that cannot keep the
        process alive)."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self.dropped += len(self._buffer)
            self._buffer.clear()
            stuck = self._busy
            self._cond.notify_all()
        if not stuck:
            self._thread.join(timeout)
        self._report_drops()
