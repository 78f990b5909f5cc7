"""A KVM smoke run: create a VM, run a few instructions of 64-bit guest
code, and report what KVM offers. ``kvmmem demo`` prints it."""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.kvm import Cap, Kvm, exits, x86
from kvmmem.memory import HostMemory

RAM_SIZE = 2 << 20
GDT_ADDR, PML4_ADDR, CODE_ADDR, DATA_ADDR = 0x500, 0x1000, 0x8000, 0x100000
REPORT_PORT = 0x10

# mov dword [DATA_ADDR], 0x6d6d766b ("kvmm"); mov eax, [DATA_ADDR];
# out 0x10, eax; hlt
GUEST_CODE = bytes.fromhex("c70425" "00001000" "6b766d6d" "8b0425" "00001000" "e710" "f4")


@dataclass(frozen=True)
class SmokeReport:
    api_version: int
    max_memslots: int
    user_memory2: bool
    memory_fault_info: bool
    guest_said: bytes
    exits: tuple[str, ...]


def run_smoke() -> SmokeReport:
    """Boot the smoke guest in a fresh VM and collect its exits."""
    with Kvm() as kvm, kvm.create_vm() as vm:
        ram = HostMemory(RAM_SIZE, "smoke.ram")
        try:
            vm.add_memslot(0, RAM_SIZE, ram.address)
            ram.write(GDT_ADDR, x86.gdt_bytes())
            ram.write(PML4_ADDR, x86.identity_page_tables(PML4_ADDR, 1 << 30))
            ram.write(CODE_ADDR, GUEST_CODE)
            vcpu = vm.create_vcpu(0)
            sregs = vcpu.get_sregs()
            x86.setup_long_mode(sregs, PML4_ADDR, GDT_ADDR)
            vcpu.set_sregs(sregs)
            regs = vcpu.get_regs()
            regs.rip, regs.rflags = CODE_ADDR, 2
            vcpu.set_regs(regs)
            said, seen = b"", []
            for _ in range(4):
                ex = vcpu.run()
                seen.append(type(ex).__name__)
                if isinstance(ex, exits.IoExit) and ex.port == REPORT_PORT:
                    said += ex.data
                if not isinstance(ex, exits.IoExit):
                    break
            if ram.read(DATA_ADDR, 4) != said:
                raise RuntimeError("guest memory and guest report disagree")
            return SmokeReport(
                api_version=kvm.get_api_version(),
                max_memslots=vm.max_memslots,
                user_memory2=vm.has_user_memory2,
                memory_fault_info=bool(vm.check_extension(Cap.MEMORY_FAULT_INFO)),
                guest_said=said,
                exits=tuple(seen),
            )
        finally:
            vm.close()
            ram.close()
