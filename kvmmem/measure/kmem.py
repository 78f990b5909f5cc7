"""Kernel memory charged to a piece of work, measured in a memory cgroup made
for that measurement.

KVM allocates its per-memslot metadata (rmap, gfn_track, lpage_info; large
arrays come from vmalloc) with accounted allocations, so it is charged to the
memory cgroup of the process that issues the ioctl. To see that charge alone,
the work runs in a process that first moves into a fresh, empty cgroup.

Two backends:

* ``cgroup1``: a v1 ``memory`` hierarchy. Reads ``memory.kmem.usage_in_bytes``
  and ``memory.kmem.max_usage_in_bytes`` (the peak is reset when the baseline
  is taken, so it covers only the work).
* ``cgroup2``: the unified hierarchy with the ``memory`` controller. Reads the
  ``kernel`` key of ``memory.stat`` (Linux 5.18+: slab, vmalloc, stacks, page
  tables, percpu and other accounted kernel memory, the closest match to v1's
  kmem counter); older kernels get the sum of ``slab``, ``vmalloc``,
  ``kernel_stack``, ``pagetables``, ``sec_pagetables`` and ``percpu``. v2 has
  no kernel-only peak counter, so ``peak_kernel_bytes`` is ``None`` there.
  The controller must be on in the parent's ``cgroup.subtree_control``; if it
  is not, it is switched on (and left on), which the kernel allows only in the
  root cgroup or one without processes of its own; otherwise the backend is
  reported unusable with that reason.

Measurement cgroups (:mod:`kvmmem.measure.cgroups`) are made inside the caller's
own cgroup (so limits and accounting of the caller's ancestors still apply),
or inside the directory named by ``parent=`` or the ``KVMMEM_KMEM_PARENT``
environment variable. Only the measured process is moved; the cgroup is
removed when it is done.
``VmallocUsed`` of ``/proc/meminfo`` is recorded as a cross-check; it is
machine-wide, so only indicative.
"""

from __future__ import annotations

import inspect
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kvmmem.measure.cgroups import (
    CGROUP1,
    CGROUP2,
    PARENT_ENV,
    KmemBackend,
    KmemError,
    KmemUnavailable,
    MemCgroup,
    Mount,
    detect,
    parse_flat_keyed,
    parse_mountinfo,
    parse_proc_cgroup,
    v2_kernel_bytes,
    vmalloc_used,
)

__all__ = ["CGROUP1", "CGROUP2", "PARENT_ENV", "KmemBackend", "KmemError", "KmemProbe",
           "KmemUnavailable", "Measurement", "MeasuredWorkError", "MemCgroup", "Mount", "detect",
           "measure", "parse_flat_keyed", "parse_mountinfo", "parse_proc_cgroup",
           "v2_kernel_bytes", "vmalloc_used"]


class MeasuredWorkError(KmemError):
    """The measured function failed in the child process.

    ``exc_type`` names the child's exception and ``child_traceback`` is its
    formatted traceback, which is also part of the message.
    """

    def __init__(self, exc_type: str, message: str, child_traceback: str) -> None:
        super().__init__(f"measured function failed in the child: {exc_type}: {message}\n"
                         f"--- child traceback ---\n{child_traceback.rstrip()}")
        self.exc_type = exc_type
        self.child_message = message
        self.child_traceback = child_traceback


@dataclass(frozen=True)
class Measurement:
    """What one measured piece of work cost in kernel memory.

    ``kernel_bytes`` is the usage at the reading minus the baseline taken
    right after the child entered its empty cgroup; ``peak_kernel_bytes`` is
    the highest usage in between minus the same baseline (``None`` on
    cgroup2). ``seconds`` runs from the call of ``fn`` to the reading.
    ``vmalloc_used_delta`` is the change of the machine-wide ``VmallocUsed``.
    """

    kernel_bytes: int
    peak_kernel_bytes: int | None
    baseline_bytes: int
    result: Any
    seconds: float
    backend: str
    vmalloc_used_delta: int | None


# ----------------------------------------------------------------- measuring

def measure(fn: Callable[..., Any], *args: Any, backend: KmemBackend | None = None) -> Measurement:
    """Run ``fn(*args)`` in a forked child inside a fresh memory cgroup.

    If ``fn`` returns normally, the reading is taken after it returned (so
    whatever it closed is no longer counted). If it is a generator function,
    the reading is taken at its single ``yield`` (the yielded value is the
    result) and the generator is then finished, so it can keep a VM open
    while it is measured and clean up afterwards. The result must pickle.
    A failure of ``fn`` raises :class:`MeasuredWorkError` with the child's
    traceback; the cgroup is removed in every case.
    """
    backend = backend or detect()
    cgroup = backend.create()
    pid = -1
    try:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _child_main(cgroup, fn, args, wfd)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as reader:
            blob = reader.read()
        _, status = os.waitpid(pid, 0)
        pid = -1
    finally:
        if pid > 0:  # interrupted while the child runs: stop our own child
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        cgroup.remove()
    return _decode(blob, status)


def _decode(blob: bytes, status: int) -> Measurement:
    if not blob:
        raise KmemError(f"measuring child ended without a report ({_describe_status(status)})")
    payload = pickle.loads(blob)
    if payload[0] == "ok":
        result: Measurement = payload[1]
        return result
    if payload[0] == "unavailable":
        raise KmemUnavailable(payload[1])
    raise MeasuredWorkError(*payload[1:])


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _child_main(cgroup: MemCgroup, fn: Callable[..., Any], args: tuple[Any, ...], wfd: int) -> NoReturn:
    try:
        try:
            payload: tuple[Any, ...] = ("ok", _measured_run(cgroup, fn, args))
        except KmemUnavailable as exc:
            payload = ("unavailable", str(exc))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            payload = ("error", type(exc).__qualname__, str(exc), traceback.format_exc())
        try:
            blob = pickle.dumps(payload)
        except Exception as exc:  # noqa: BLE001
            blob = pickle.dumps(("error", type(exc).__qualname__,
                                 f"the result of the measured function cannot be pickled: {exc}",
                                 traceback.format_exc()))
        with os.fdopen(wfd, "wb") as writer:
            writer.write(blob)
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(0)


def _measured_run(cgroup: MemCgroup, fn: Callable[..., Any], args: tuple[Any, ...]) -> Measurement:
    cgroup.add(os.getpid())
    cgroup.reset_peak()
    vmalloc_before = vmalloc_used()
    baseline = cgroup.kernel_bytes()
    start = time.perf_counter()
    out = fn(*args)
    generator = out if inspect.isgenerator(out) else None
    if generator is not None:
        try:
            out = next(generator)
        except StopIteration as stop:
            out, generator = stop.value, None
    seconds = time.perf_counter() - start
    usage, peak = cgroup.kernel_bytes(), cgroup.peak_kernel_bytes()
    vmalloc_after = vmalloc_used()
    if generator is not None:
        try:
            next(generator)
        except StopIteration:
            pass
        else:
            generator.close()
            raise KmemError("a measured generator must yield exactly once")
    return Measurement(
        kernel_bytes=usage - baseline,
        peak_kernel_bytes=None if peak is None else max(peak, usage) - baseline,
        baseline_bytes=baseline,
        result=out,
        seconds=seconds,
        backend=cgroup.backend.kind,
        vmalloc_used_delta=None if vmalloc_before is None or vmalloc_after is None
        else vmalloc_after - vmalloc_before,
    )


class KmemProbe:
    """Several readings in one long-lived process.

    On entry, moves ``pid`` (default: this process) into a fresh memory
    cgroup and takes the baseline; ``kernel_bytes()`` then reads the charge
    since entry as often as wanted. On exit the process is moved back to the
    cgroup it came from and the probe's cgroup is removed. Processes that
    ``pid`` forked meanwhile stay in it; the removal then fails and says so.
    """

    def __init__(self, pid: int | None = None, backend: KmemBackend | None = None) -> None:
        if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0):
            raise ValueError(f"pid must be a positive int, got {pid!r}")
        self.pid = os.getpid() if pid is None else pid
        self._backend = backend
        self._cgroup: MemCgroup | None = None
        self._origin: Path | None = None
        self.baseline_bytes = 0
        self._vmalloc_before: int | None = None

    @property
    def backend(self) -> str:
        return self._live().backend.kind

    @property
    def path(self) -> Path:
        return self._live().path

    def __enter__(self) -> KmemProbe:
        backend = self._backend or detect()
        try:
            origin = backend.cgroup_dir_of(self.pid)
        except (OSError, KeyError) as exc:
            raise KmemError(f"cannot find the memory cgroup of pid {self.pid}: {exc}") from None
        cgroup = backend.create()
        try:
            cgroup.add(self.pid)
        except BaseException:
            cgroup.remove()
            raise
        self._cgroup, self._origin = cgroup, origin
        cgroup.reset_peak()
        self._vmalloc_before = vmalloc_used()
        self.baseline_bytes = cgroup.kernel_bytes()
        return self

    def _live(self) -> MemCgroup:
        if self._cgroup is None:
            raise KmemError("KmemProbe is not active: use it as a context manager")
        return self._cgroup

    def kernel_bytes(self) -> int:
        """Kernel memory charged since entry."""
        return self._live().kernel_bytes() - self.baseline_bytes

    def peak_kernel_bytes(self) -> int | None:
        """Highest charge since entry (``None`` on cgroup2)."""
        peak = self._live().peak_kernel_bytes()
        return None if peak is None else peak - self.baseline_bytes

    def vmalloc_used_delta(self) -> int | None:
        """Change of the machine-wide ``VmallocUsed`` since entry (indicative)."""
        now = vmalloc_used()
        return None if now is None or self._vmalloc_before is None else now - self._vmalloc_before

    def __exit__(self, *exc: object) -> None:
        cgroup, origin = self._live(), self._origin
        self._cgroup = None
        try:
            if self.pid in cgroup.pids() and origin is not None:
                (origin / "cgroup.procs").write_text(f"{self.pid}\n")
        finally:
            cgroup.remove()
