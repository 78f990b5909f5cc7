"""Typed vCPU exits: what ``Vcpu.run()`` returns, one class per exit reason."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class VcpuExit:
    """Base of all exits; ``reason`` is KVM's KVM_EXIT_* number."""

    reason: int


@dataclass(frozen=True, slots=True)
class IoExit(VcpuExit):
    """Port I/O. For OUT, ``data`` holds ``size * count`` bytes written by the
    guest; an IN is answered with ``Vcpu.complete_io_in``."""

    port: int
    size: int
    count: int
    is_write: bool
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class MmioExit(VcpuExit):
    """An access to a guest-physical address no memslot covers. A read is
    answered with ``Vcpu.complete_mmio_read`` before the next ``run``."""

    phys_addr: int
    length: int
    is_write: bool
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HltExit(VcpuExit):
    """The guest executed HLT (no in-kernel LAPIC to wait for interrupts)."""


@dataclass(frozen=True, slots=True)
class ShutdownExit(VcpuExit):
    """Triple fault: the machine must be reset or stopped."""


@dataclass(frozen=True, slots=True)
class FailEntryExit(VcpuExit):
    """The CPU refused to enter the guest (bad register state)."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class InternalErrorExit(VcpuExit):
    """KVM could not handle an exit itself (e.g. emulation failed).
    ``ndata`` is how many words of ``data`` KVM filled (at most 16 are kept)."""

    suberror: int
    data: tuple[int, ...] = field(default_factory=tuple)
    ndata: int = 0


@dataclass(frozen=True, slots=True)
class SystemEventExit(VcpuExit):
    """Reset, shutdown or crash requested through firmware/PSCI."""

    type: int
    data: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class MemoryFaultExit(VcpuExit):
    """KVM could not resolve a guest access to memory that has a memslot
    (KVM_CAP_MEMORY_FAULT_INFO): e.g. the host page is protected."""

    flags: int
    gpa: int
    size: int


@dataclass(frozen=True, slots=True)
class IntrExit(VcpuExit):
    """KVM_RUN returned early for a signal or ``immediate_exit`` (a kick)."""


@dataclass(frozen=True, slots=True)
class OtherExit(VcpuExit):
    """An exit reason kvmmem has no class for; ``hardware_exit_reason`` is
    KVM's raw data for KVM_EXIT_UNKNOWN."""

    hardware_exit_reason: int = 0
