"""``Vcpu``: a vCPU file descriptor, its registers and its run loop step."""

from __future__ import annotations

import errno
import mmap
import signal
import threading
from typing import Any

from kvmmem.kvm import exits
from kvmmem.kvm._fd import FdObject
from kvmmem.kvm._lib import ffi, lib
from kvmmem.kvm.cpuid import Cpuid
from kvmmem.kvm.error import KvmError

KICK_SIGNAL = signal.SIGUSR1
"""Signal ``Vcpu.kick`` sends to a thread blocked in KVM_RUN."""


class Vcpu(FdObject):
    """One vCPU: registers, CPUID and ``run()``, which issues KVM_RUN with
    the GIL released and returns a typed exit (see :mod:`kvmmem.kvm.exits`)."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        super().__init__(fd)
        self.id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = ffi.from_buffer(self._map)
        self.run_struct: Any = ffi.cast("struct kvm_run *", self._page)
        self._exit_data = lib.kvmmem_run_exit_data(self.run_struct)
        self._thread_id: int | None = None

    # -- registers -----------------------------------------------------------

    def get_regs(self) -> Any:
        """KVM_GET_REGS: a ``struct kvm_regs`` (fields rax..r15, rip, rflags)."""
        regs = ffi.new("struct kvm_regs *")
        self._ioctl_ptr("KVM_GET_REGS", lib.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: Any) -> None:
        """KVM_SET_REGS."""
        self._ioctl_ptr("KVM_SET_REGS", lib.KVM_SET_REGS, regs)

    def get_sregs(self) -> Any:
        """KVM_GET_SREGS: segments, descriptor tables, control registers, EFER."""
        sregs = ffi.new("struct kvm_sregs *")
        self._ioctl_ptr("KVM_GET_SREGS", lib.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: Any) -> None:
        """KVM_SET_SREGS."""
        self._ioctl_ptr("KVM_SET_SREGS", lib.KVM_SET_SREGS, sregs)

    def set_cpuid2(self, cpuid: Cpuid) -> None:
        """KVM_SET_CPUID2: the CPUID table the guest sees."""
        self._ioctl_ptr("KVM_SET_CPUID2", lib.KVM_SET_CPUID2, cpuid.raw)

    def get_lapic(self) -> Any:
        """KVM_GET_LAPIC: the in-kernel local APIC's registers."""
        state = ffi.new("struct kvm_lapic_state *")
        self._ioctl_ptr("KVM_GET_LAPIC", lib.KVM_GET_LAPIC, state)
        return state

    def set_lapic(self, state: Any) -> None:
        """KVM_SET_LAPIC."""
        self._ioctl_ptr("KVM_SET_LAPIC", lib.KVM_SET_LAPIC, state)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: runnable, halted, waiting for SIPI..."""
        state = ffi.new("struct kvm_mp_state *")
        self._ioctl_ptr("KVM_GET_MP_STATE", lib.KVM_GET_MP_STATE, state)
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE (e.g. KVM_MP_STATE_RUNNABLE to wake a halted vCPU on reset)."""
        state = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        self._ioctl_ptr("KVM_SET_MP_STATE", lib.KVM_SET_MP_STATE, state)

    def get_vcpu_events(self) -> Any:
        """KVM_GET_VCPU_EVENTS: pending exceptions, interrupts and NMIs."""
        events = ffi.new("struct kvm_vcpu_events *")
        self._ioctl_ptr("KVM_GET_VCPU_EVENTS", lib.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: Any) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._ioctl_ptr("KVM_SET_VCPU_EVENTS", lib.KVM_SET_VCPU_EVENTS, events)

    def get_xsave(self) -> Any:
        """KVM_GET_XSAVE: the FPU, SSE and AVX state (the 4 KiB XSAVE area)."""
        state = ffi.new("struct kvm_xsave *")
        self._ioctl_ptr("KVM_GET_XSAVE", lib.KVM_GET_XSAVE, state)
        return state

    def set_xsave(self, state: Any) -> None:
        """KVM_SET_XSAVE."""
        self._ioctl_ptr("KVM_SET_XSAVE", lib.KVM_SET_XSAVE, state)

    def get_xcrs(self) -> Any:
        """KVM_GET_XCRS: the extended control registers (XCR0)."""
        state = ffi.new("struct kvm_xcrs *")
        self._ioctl_ptr("KVM_GET_XCRS", lib.KVM_GET_XCRS, state)
        return state

    def set_xcrs(self, state: Any) -> None:
        """KVM_SET_XCRS."""
        self._ioctl_ptr("KVM_SET_XCRS", lib.KVM_SET_XCRS, state)

    def get_debugregs(self) -> Any:
        """KVM_GET_DEBUGREGS: DR0-DR3, DR6, DR7."""
        state = ffi.new("struct kvm_debugregs *")
        self._ioctl_ptr("KVM_GET_DEBUGREGS", lib.KVM_GET_DEBUGREGS, state)
        return state

    def set_debugregs(self, state: Any) -> None:
        """KVM_SET_DEBUGREGS."""
        self._ioctl_ptr("KVM_SET_DEBUGREGS", lib.KVM_SET_DEBUGREGS, state)

    def get_msrs(self, indices: list[int]) -> list[tuple[int, int]]:
        """KVM_GET_MSRS: (index, value) of the MSRs read, in order; KVM stops at
        the first it cannot read, so the list may be shorter than ``indices``."""
        msrs = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        done = self._ioctl_ptr("KVM_GET_MSRS", lib.KVM_GET_MSRS, msrs)
        return [(int(msrs.entries[i].index), int(msrs.entries[i].data)) for i in range(done)]

    def set_msrs(self, entries: list[tuple[int, int]]) -> int:
        """KVM_SET_MSRS: how many of ``entries`` KVM set (it stops at the first refused)."""
        msrs = ffi.new("struct kvm_msrs *", {"entries": len(entries)})
        msrs.nmsrs = len(entries)
        for i, (index, value) in enumerate(entries):
            msrs.entries[i].index, msrs.entries[i].data = index, value
        return self._ioctl_ptr("KVM_SET_MSRS", lib.KVM_SET_MSRS, msrs)


    # -- running -------------------------------------------------------------

    def run(self) -> exits.VcpuExit:
        """KVM_RUN until the next exit to userspace, decoded.

        A signal or a kick gives :class:`~kvmmem.kvm.exits.IntrExit`; an
        EFAULT that KVM explains as a memory fault gives
        :class:`~kvmmem.kvm.exits.MemoryFaultExit`; other failures raise.
        """
        run = self.run_struct
        run.exit_reason = lib.KVM_EXIT_UNKNOWN
        self._thread_id = threading.get_ident()
        self.ioctl_counts["KVM_RUN"] += 1
        ret = lib.kvmmem_ioctl_int(self._fd, lib.KVM_RUN, 0)
        if ret < 0:
            err = ffi.errno
            if err == errno.EINTR:
                run.immediate_exit = 0
                return exits.IntrExit(lib.KVM_EXIT_INTR)
            if err == errno.EFAULT and run.exit_reason == lib.KVM_EXIT_MEMORY_FAULT:
                return self._memory_fault()
            raise KvmError(err, "KVM_RUN", self._closed_detail())
        return self._decode()

    def complete_pending(self) -> None:
        """Let KVM finish an interrupted I/O or MMIO instruction without
        running further guest code (KVM_RUN with ``immediate_exit`` set),
        so that register writes that follow are not undone by it."""
        self.run_struct.immediate_exit = 1
        try:
            result = self.run()
        finally:
            self.run_struct.immediate_exit = 0
        if not isinstance(result, exits.IntrExit):
            raise KvmError(errno.EINVAL, "KVM_RUN", f"immediate exit gave {result}")

    def kick(self) -> None:
        """Make a concurrent or the next ``run()`` return :class:`IntrExit`.

        Sets ``immediate_exit`` and signals the thread that last ran this
        vCPU; the process must have a handler for ``KICK_SIGNAL`` (Python's
        ``signal.signal``), or the signal's default action applies.
        """
        self.run_struct.immediate_exit = 1
        tid = self._thread_id
        # signalling a thread that has ended is undefined: only live ones
        if tid is not None and any(t.ident == tid for t in threading.enumerate()):
            signal.pthread_kill(tid, KICK_SIGNAL)

    def complete_io_in(self, data: bytes) -> None:
        """Answer the pending IN: the bytes the guest's register receives."""
        io = self.run_struct.io
        expected = io.size * io.count
        if len(data) != expected:
            raise ValueError(f"IN of {expected} bytes answered with {len(data)}")
        ffi.memmove(self._page + io.data_offset, data, expected)

    def complete_mmio_read(self, data: bytes) -> None:
        """Answer the pending MMIO read with ``len`` bytes of data."""
        mmio = self.run_struct.mmio
        if mmio.is_write or len(data) != mmio.len:
            raise ValueError(f"MMIO read of {mmio.len} bytes answered with {len(data)}")
        ffi.memmove(mmio.data, data, len(data))

    def _decode(self) -> exits.VcpuExit:
        run = self.run_struct
        reason = run.exit_reason
        if reason == lib.KVM_EXIT_IO:
            io = run.io
            is_write = io.direction == lib.KVM_EXIT_IO_OUT
            data = ffi.buffer(self._page + io.data_offset, io.size * io.count)[:] if is_write else b""
            return exits.IoExit(reason, io.port, io.size, io.count, is_write, data)
        if reason == lib.KVM_EXIT_MMIO:
            m = run.mmio
            data = ffi.buffer(m.data, m.len)[:] if m.is_write else b""
            return exits.MmioExit(reason, m.phys_addr, m.len, bool(m.is_write), data)
        if reason == lib.KVM_EXIT_HLT:
            return exits.HltExit(reason)
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return exits.ShutdownExit(reason)
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            f = run.fail_entry
            return exits.FailEntryExit(reason, f.hardware_entry_failure_reason, f.cpu)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = run.internal
            return exits.InternalErrorExit(reason, ie.suberror, tuple(ie.data[0:min(ie.ndata, 16)]),
                                           ie.ndata)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            se = run.system_event
            return exits.SystemEventExit(reason, se.type, tuple(se.data[0:min(se.ndata, 16)]))
        if reason == lib.KVM_EXIT_MEMORY_FAULT:
            return self._memory_fault()
        if reason == lib.KVM_EXIT_INTR:
            return exits.IntrExit(reason)
        return exits.OtherExit(reason, run.hw.hardware_exit_reason)

    def _memory_fault(self) -> exits.MemoryFaultExit:
        mf = ffi.cast("struct kvmmem_memory_fault *", self._exit_data)
        return exits.MemoryFaultExit(lib.KVM_EXIT_MEMORY_FAULT, mf.flags, mf.gpa, mf.size)

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the vCPU fd."""
        if self._map is not None and not self._map.closed:
            self.run_struct = None
            self._exit_data = None
            ffi.release(self._page)
            self._map.close()
        super().close()


__all__ = ["Vcpu", "KICK_SIGNAL"]
