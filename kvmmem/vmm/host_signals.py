"""SIGINT, SIGTERM and SIGHUP end the VM as they end QEMU.

QEMU's ``termsig_handler`` (os-posix.c) turns each of them into a shutdown
request with the reason ``host-signal``: clients get one ``SHUTDOWN`` event
(``"guest": false, "reason": "host-signal"``), the monitor socket is removed,
the process exits 0, and it says ``terminating on signal N from pid P``.

Here the three signals are blocked in every thread (the mask is set before
the machine and its threads exist, so they inherit it) and one thread takes
them with ``sigwaitinfo``. It acts from ordinary thread context, so it may
take locks and raise events; the vCPU is stopped through
``Machine.shutdown``, whose kick cannot be lost the way a Python signal
handler can be when the signal lands just before ``KVM_RUN``.

A signal taken before a machine is attached (while it is built: opening a
``-serial`` FIFO nobody reads, waiting on a vhost-user back-end) ends the
process at once, status 0: the thread building it may be blocked for good,
and nothing outside the process exists yet (the caller attaches the machine
before it creates the QMP socket), as QEMU's open() fails with EINTR there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmmem.vmm.machine import Machine
    from kvmmem.vmm.qmp import QmpServer

HOST_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
REASON = "host-signal"


class HostSignals:
    """Block the host signals now; stop the machine when one comes."""

    def __init__(self, prog: str = "kvmmem run") -> None:
        self.prog = prog
        self.received: int | None = None
        """The first signal taken, if any."""
        self._machine: Machine | None = None
        self._server: QmpServer | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HOST_SIGNALS)
        self._thread = threading.Thread(target=self._wait, name="host-signals", daemon=True)
        self._thread.start()

    def attach(self, machine: Machine, server: QmpServer | None) -> None:
        """What to stop; a signal taken before this stops it at once."""
        with self._lock:
            self._machine, self._server = machine, server
            if self.received is not None:
                self._stop()

    def close(self) -> None:
        """Stop waiting and give the thread its old signal mask back."""
        with self._lock:
            self._closing = True
        if self._thread.ident is not None and self._thread.is_alive():
            signal.pthread_kill(self._thread.ident, signal.SIGHUP)   # ends its sigwaitinfo
        self._thread.join()
        while signal.sigtimedwait(HOST_SIGNALS, 0) is not None:
            pass            # one that came while stopping: the VM is ending anyway
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)

    def _wait(self) -> None:
        while True:
            info = signal.sigwaitinfo(HOST_SIGNALS)
            with self._lock:
                if self._closing:
                    return
                if self.received is not None:
                    continue               # already stopping: once is enough
                self.received = info.si_signo
                print(f"{self.prog}: terminating on signal {info.si_signo} from pid "
                      f"{info.si_pid}", file=sys.stderr, flush=True)
                if self._machine is None:
                    os._exit(0)
                self._stop()

    def _stop(self) -> None:
        if self._server is not None:
            self._server.notify_shutdown(guest=False, reason=REASON)
        if self._machine is not None:
            self._machine.shutdown(0)
