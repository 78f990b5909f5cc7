"""Connecting again to vhost-user back-ends that went away (the chardev's
``reconnect=SECONDS``, QEMU's ``tcp_chr_reconnect`` for vhost-user-blk).

One thread for the machine: every device whose back-end has gone and whose
props ask for it is tried again every ``reconnect`` seconds, under the
machine's lock (a reconnection attaches a memory listener and changes the
memslot budget, as plugging does). A back-end that is not there yet is
tried again later; one that came back unfit (other features, another disk
size, too few memory slots) is logged, rate-limited, and tried again too.
"""

from __future__ import annotations

import logging
import threading
import time

from kvmmem.devices.ratelimit import RateLimit
from kvmmem.vhost.backends import VhostBackends
from kvmmem.vhost.frontend import VhostUserError

__all__ = ["VhostReconnector"]

log = logging.getLogger(__name__)


class VhostReconnector:
    """The machine's reconnection thread (started only if a device asks for it)."""

    def __init__(self, vhost: VhostBackends, lock: threading.RLock) -> None:
        self.vhost = vhost
        self.lock = lock
        self.reconnects = 0
        self._stop = threading.Event()
        self._due: dict[str, float] = {}
        self._refusals = RateLimit(interval=60.0)
        self._thread = threading.Thread(target=self._run, name="vhost-reconnect", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for dev_id, backend in list(self.vhost.devices.items()):
                interval = backend.props.reconnect
                if not interval or backend.frontend.connected:
                    self._due.pop(dev_id, None)
                    continue
                due = self._due.setdefault(dev_id, now + interval)
                if now < due:
                    continue
                self._due[dev_id] = now + interval
                self._try(dev_id)

    def _try(self, dev_id: str) -> None:
        try:
            with self.lock:
                if self._stop.is_set() or dev_id not in self.vhost.devices:
                    return
                if self.vhost.reconnect(dev_id):
                    self.reconnects += 1
        except VhostUserError as exc:
            if (held := self._refusals.check()) is not None:
                log.warning("%s%s", exc, RateLimit.note(held))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
