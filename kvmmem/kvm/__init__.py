"""The KVM layer: one class per file descriptor (``Kvm``, ``Vm``, ``Vcpu``),
one method per ioctl, one error type, typed vCPU exits."""

from kvmmem.kvm import exits
from kvmmem.kvm._lib import ffi, lib
from kvmmem.kvm.caps import Cap
from kvmmem.kvm.cpuid import Cpuid, CpuidEntry
from kvmmem.kvm.error import KvmError, KvmUnavailableError
from kvmmem.kvm.system import Kvm, kvm_available
from kvmmem.kvm.vcpu import Vcpu
from kvmmem.kvm.vm import PAGE_SIZE, Memslot, Vm

__all__ = [
    "Cap", "Cpuid", "CpuidEntry", "Kvm", "KvmError", "KvmUnavailableError", "Memslot",
    "PAGE_SIZE", "Vcpu", "Vm", "exits", "ffi", "kvm_available", "lib",
]
