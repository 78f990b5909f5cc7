"""The state of a vCPU and of a VM's in-kernel devices, as bytes, for a
snapshot or a migration (what QEMU's ``kvm_arch_get_registers`` /
``kvm_arch_put_registers`` and the irqchip, PIT and clock state cover).

Every part is KVM's own structure copied byte for byte (the layouts come
from ``<linux/kvm.h>`` through cdefs/), so a restore into a VM of the same
KVM gives back exactly what was saved. MSRs are those of
``KVM_GET_MSR_INDEX_LIST`` that this vCPU can read. Before the registers
are read, an instruction KVM left half done (a port IN or MMIO read whose
data the VMM supplied) is finished with ``immediate_exit``
(``Vcpu.complete_pending``), or its result would be lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvmmem.kvm._lib import ffi, lib
from kvmmem.kvm.error import KvmError
from kvmmem.kvm.vcpu import Vcpu
from kvmmem.kvm.vm import Vm

__all__ = ["VcpuState", "VmState", "readable_msrs", "restore_vcpu", "restore_vm", "save_vcpu",
           "save_vm"]

MSR_IA32_TSC_DEADLINE = 0x6E0
IRQCHIPS = (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC)


@dataclass(frozen=True)
class VcpuState:
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    msrs: tuple[tuple[int, int], ...]
    mp_state: int
    lapic: bytes
    events: bytes


@dataclass(frozen=True)
class VmState:
    irqchips: tuple[bytes, ...]
    pit: bytes
    clock: int


def _blob(cdata: Any) -> bytes:
    return bytes(ffi.buffer(cdata))


def _struct(ctype: str, data: bytes) -> Any:
    """A new ``ctype`` filled with ``data``, which must be exactly its size."""
    cdata = ffi.new(f"{ctype} *")
    size = ffi.sizeof(ctype)
    if len(data) != size:
        raise ValueError(f"{ctype} is {size} bytes, the state has {len(data)}")
    ffi.memmove(cdata, data, size)
    return cdata


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> list[int]:
    """The MSRs of ``indices`` this vCPU can read (KVM stops at the first it
    cannot; QEMU likewise keeps only those KVM reports as supported)."""
    readable: list[int] = []
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        readable += [index for index, _ in got]
        rest = rest[len(got) + 1:]          # skip the one that failed
    return readable


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> VcpuState:
    """Everything KVM holds of ``vcpu`` (call with it stopped, outside KVM_RUN)."""
    vcpu.complete_pending()
    msrs = vcpu.get_msrs(msr_indices)
    if len(msrs) != len(msr_indices):
        raise KvmError(0, "KVM_GET_MSRS", f"read {len(msrs)} of {len(msr_indices)} MSRs "
                       "(use readable_msrs)")
    return VcpuState(regs=_blob(vcpu.get_regs()), sregs=_blob(vcpu.get_sregs()),
                     xsave=_blob(vcpu.get_xsave()), xcrs=_blob(vcpu.get_xcrs()),
                     debugregs=_blob(vcpu.get_debugregs()), msrs=tuple(msrs),
                     mp_state=vcpu.get_mp_state(), lapic=_blob(vcpu.get_lapic()),
                     events=_blob(vcpu.get_vcpu_events()))


def restore_vcpu(vcpu: Vcpu, state: VcpuState) -> None:
    """Load ``state`` into ``vcpu``, in the order of QEMU's kvm_arch_put_registers."""
    vcpu.set_regs(_struct("struct kvm_regs", state.regs))
    vcpu.set_xsave(_struct("struct kvm_xsave", state.xsave))
    vcpu.set_xcrs(_struct("struct kvm_xcrs", state.xcrs))
    vcpu.set_sregs(_struct("struct kvm_sregs", state.sregs))
    done = vcpu.set_msrs(list(state.msrs))
    if done != len(state.msrs):
        index = state.msrs[done][0]
        raise KvmError(0, "KVM_SET_MSRS", f"MSR {index:#x} was refused ({done} of "
                       f"{len(state.msrs)} set)")
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_lapic(_struct("struct kvm_lapic_state", state.lapic))
    # The TSC deadline is dropped while the LAPIC timer is not in deadline
    # mode, which it is only now: set again (QEMU's kvm_put_tscdeadline_msr).
    deadline = [(index, value) for index, value in state.msrs if index == MSR_IA32_TSC_DEADLINE]
    if deadline and vcpu.set_msrs(deadline) != 1:
        raise KvmError(0, "KVM_SET_MSRS", "the TSC deadline was refused")
    vcpu.set_vcpu_events(_struct("struct kvm_vcpu_events", state.events))
    vcpu.set_debugregs(_struct("struct kvm_debugregs", state.debugregs))


def save_vm(vm: Vm) -> VmState:
    """The in-kernel PICs and IOAPIC, the PIT and the clock."""
    return VmState(irqchips=tuple(_blob(vm.get_irqchip(chip)) for chip in IRQCHIPS),
                   pit=_blob(vm.get_pit2()), clock=int(vm.get_clock().clock))


def restore_vm(vm: Vm, state: VmState) -> None:
    for blob in state.irqchips:
        vm.set_irqchip(_struct("struct kvm_irqchip", blob))
    vm.set_pit2(_struct("struct kvm_pit_state2", state.pit))
    clock = ffi.new("struct kvm_clock_data *")
    clock.clock = state.clock
    vm.set_clock(clock)
