"""Keeping the vCPU out of guest code while another thread changes memslots.

KVM has no atomic way to replace a memslot: ``KVM_SET_USER_MEMORY_REGION``
deletes one slot and creates another in separate ioctls, and a vCPU that
touches the range in between takes an exit as if the memory were not there
(KVM's ``Documentation/virt/kvm/api.rst``, "KVM_SET_USER_MEMORY_REGION":
changes are not atomic with respect to running vCPUs). QEMU stops the vCPUs
around such changes (``pause_all_vcpus`` / ``resume_all_vcpus``); so does
:class:`VcpuGate`, for kvmmem's one-vCPU machine:

- the vCPU thread calls :meth:`enter_guest` before each ``KVM_RUN`` (it waits
  there while another thread holds the gate) and :meth:`leave_guest` after;
- any thread wraps a change in ``with gate.quiesced():``. On the vCPU thread
  itself (a request handled in an MMIO exit) that is free: no guest code runs
  while an exit is handled. From another thread it kicks the vCPU out of
  ``KVM_RUN`` (``Vcpu.kick``), waits until it has left, lets the change
  happen and then lets the vCPU run again.

The caller may hold the machine's lock: the vCPU thread leaves the guest
before it takes that lock to handle the exit, so the wait cannot deadlock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class VcpuGate:
    """Stops one vCPU thread between two ``KVM_RUN`` calls for another thread."""

    def __init__(self, kick: Callable[[], None], timeout: float = 10.0) -> None:
        self._kick = kick
        self._timeout = timeout
        self._cond = threading.Condition()
        self._holders = 0
        self._in_guest = False
        self._vcpu_thread: int | None = None
        self.quiesces = 0
        """How many times another thread stopped the vCPU (for tests and statistics)."""

    # -- the vCPU thread -------------------------------------------------------

    def enter_guest(self) -> None:
        """Before ``KVM_RUN``: wait while another thread holds the gate."""
        with self._cond:
            self._vcpu_thread = threading.get_ident()
            while self._holders:
                self._cond.wait()
            self._in_guest = True

    def leave_guest(self) -> None:
        """After ``KVM_RUN`` returned (whatever it returned)."""
        with self._cond:
            self._in_guest = False
            self._cond.notify_all()

    # -- any thread ------------------------------------------------------------

    @property
    def in_guest(self) -> bool:
        return self._in_guest

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """No guest code runs inside this block. Raises TimeoutError (and
        changes nothing) if the vCPU does not leave ``KVM_RUN`` in time."""
        if threading.get_ident() == self._vcpu_thread:
            yield
            return
        with self._cond:
            self._holders += 1
            try:
                if self._in_guest:
                    self._kick()
                if not self._cond.wait_for(lambda: not self._in_guest, self._timeout):
                    raise TimeoutError("the vCPU did not leave KVM_RUN")
            except BaseException:
                self._release()
                raise
            self.quiesces += 1
        try:
            yield
        finally:
            with self._cond:
                self._release()

    def _release(self) -> None:
        self._holders -= 1
        if not self._holders:
            self._cond.notify_all()

