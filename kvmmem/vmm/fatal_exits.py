"""vCPU exits the machine cannot go on from, described in one line.

QEMU stops the VM in the ``internal-error`` run state when KVM_RUN fails or
returns an exit it cannot handle: KVM_EXIT_INTERNAL_ERROR (accel/kvm/kvm-all.c,
``kvm_handle_internal_error``, which prints the suberror and KVM's extra
data words), KVM_EXIT_FAIL_ENTRY and unknown exit reasons
(target/i386/kvm/kvm.c, ``kvm_arch_handle_exit``). kvmmem does the same;
this module turns such an exit into the one message that reports it, with
what KVM gave: RIP, suberror, ``ndata`` and the data words, and for an
emulation failure the instruction bytes KVM fetched (Documentation/virt/kvm/
api.rst, "KVM_EXIT_INTERNAL_ERROR": with
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES in the first data word,
the next two words hold ``insn_size`` and up to 15 instruction bytes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvmmem.kvm import KvmError, exits, lib

if TYPE_CHECKING:
    from kvmmem.kvm import Vcpu

SUBERRORS = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "exit while delivering an event",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}


def instruction_bytes(ex: exits.InternalErrorExit) -> bytes | None:
    """The instruction bytes of an emulation failure, if KVM gave them."""
    if ex.suberror != lib.KVM_INTERNAL_ERROR_EMULATION or len(ex.data) < 3 or \
            not ex.data[0] & lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
        return None
    raw = ex.data[1].to_bytes(8, "little") + ex.data[2].to_bytes(8, "little")
    return raw[1:1 + min(raw[0], 15)]


def _rip(vcpu: Vcpu) -> str:
    try:
        return f"{vcpu.get_regs().rip:#x}"
    except KvmError as exc:                      # the report must not fail in turn
        return f"unknown ({exc})"


def describe(vcpu: Vcpu, ex: exits.VcpuExit | KvmError) -> str:
    """One line saying why ``vcpu`` stopped, with the exit's data."""
    where = f"vCPU {vcpu.id} at rip {_rip(vcpu)}"
    if isinstance(ex, KvmError):
        what = f"KVM_RUN failed: {ex}"
    elif isinstance(ex, exits.InternalErrorExit):
        what = (f"KVM internal error, suberror {ex.suberror} "
                f"({SUBERRORS.get(ex.suberror, 'unknown')})")
        insn = instruction_bytes(ex)
        if insn is not None:
            what += f", instruction bytes {insn.hex(' ') or '(none)'}"
        what += f", ndata {ex.ndata}"
        if ex.data:
            what += ", data " + " ".join(f"{word:#x}" for word in ex.data)
    elif isinstance(ex, exits.FailEntryExit):
        what = (f"KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY), hardware entry "
                f"failure reason {ex.hardware_entry_failure_reason:#x} on host cpu {ex.cpu}")
    elif isinstance(ex, exits.MemoryFaultExit):
        what = (f"KVM memory fault at {ex.gpa:#x} (+{ex.size:#x}, flags {ex.flags:#x}): "
                "the host cannot back or emulate the access")
    elif isinstance(ex, exits.OtherExit):
        what = (f"unhandled KVM exit reason {ex.reason} "
                f"(hardware exit reason {ex.hardware_exit_reason:#x})")
    else:
        what = f"unhandled KVM exit {ex}"
    return f"{where}: {what}"
