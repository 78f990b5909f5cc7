"""Running the memslot merges that ``memslots=exact`` defers.

A device with a ``merge-delay`` answers a plug without merging its new
memslots with their neighbours (``exact_cover``, "Deferred merges") and
fires ``merge_notifiers``. :class:`MemslotMerger` then waits until the
device has had no such plug for ``merge-delay`` milliseconds, so that a
burst of plugs (Linux's driver plugging 128 MiB after 128 MiB) merges once,
at its end, and calls :meth:`VirtioMem.merge_memslots` under the machine's
lock. The merge replaces memslots over plugged memory; the device stops the
vCPU around it through ``VirtioMem.quiesce`` (:mod:`vcpu_gate`), as it does
for a merge on the request path. One thread serves every device of the
machine, as QEMU's timers all run on its main loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

from kvmmem.devices.virtio_mem import VirtioMem

log = logging.getLogger(__name__)


class MemslotMerger:
    """Merges the deferred memslots of devices once they stop plugging."""

    def __init__(self, lock: AbstractContextManager[object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = lock                    # the machine's lock, held for each merge
        self._clock = clock
        self._cond = threading.Condition()
        self._due: dict[str, tuple[float, VirtioMem]] = {}    # device id -> (deadline, device)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.merges = 0
        """How many merge steps (one group of grid memslots each) were done."""

    def watch(self, dev: VirtioMem) -> None:
        """Merge ``dev``'s deferred memslots ``merge-delay`` ms after its last plug."""
        dev.merge_notifiers.append(lambda _: self._plugged(dev))

    def _plugged(self, dev: VirtioMem) -> None:
        # Called by the device, on the vCPU thread, with the machine's lock held:
        # only note the deadline; the merge runs on this object's thread.
        with self._cond:
            if self._closed:
                return
            self._due[dev.id] = (self._clock() + dev.props.merge_delay / 1000, dev)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="memslot-merger",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    now = self._clock()
                    ready = [dev for deadline, dev in self._due.values() if deadline <= now]
                    if ready:
                        break
                    wait = min((d for d, _ in self._due.values()), default=now + 3600) - now
                    self._cond.wait(wait)
                if self._closed:
                    return
                for dev in ready:
                    del self._due[dev.id]
            for dev in ready:
                self._merge(dev)

    def _merge(self, dev: VirtioMem) -> None:
        # One group of grid memslots at a time (at most 8 GiB of merges, a few
        # ms with the vCPU stopped), the lock released in between so that the
        # guest's exits are handled: a 1 TiB burst does not stall it for a second.
        try:
            while not self._closed:
                with self._lock:
                    if not dev.merges_pending or not dev.merge_memslots(one_group=True):
                        return
                    self.merges += 1
        except Exception:                   # the thread must not die: log and go on
            log.exception("%s: deferred memslot merge failed", dev.id)

    def close(self) -> None:
        """Stop the thread (pending merges are dropped)."""
        with self._cond:
            self._closed = True
            self._due.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(10)
