"""``Cpuid``: a ``struct kvm_cpuid2`` with its entries, as KVM hands it out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kvmmem.kvm._lib import ffi


@dataclass(frozen=True)
class CpuidEntry:
    """One CPUID leaf (``function``/``index``) and its four registers."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


class Cpuid:
    """Owns a ``kvm_cpuid2`` buffer; entries can be read and changed in place
    before the table is given to ``Vcpu.set_cpuid2``."""

    def __init__(self, buffer: Any, capacity: int) -> None:
        self._buffer = buffer
        self.raw = ffi.cast("struct kvm_cpuid2 *", buffer)
        self.capacity = capacity

    @classmethod
    def allocate(cls, capacity: int) -> Cpuid:
        size = ffi.sizeof("struct kvm_cpuid2") + capacity * ffi.sizeof("struct kvm_cpuid_entry2")
        cpuid = cls(ffi.new("char[]", size), capacity)
        cpuid.raw.nent = capacity
        return cpuid

    def __len__(self) -> int:
        return int(self.raw.nent)

    def __iter__(self) -> Iterator[CpuidEntry]:
        for i in range(len(self)):
            e = self.raw.entries[i]
            yield CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)

    def find(self, function: int, index: int = 0) -> Any:
        """The raw entry for a leaf (writable), or None."""
        for i in range(len(self)):
            e = self.raw.entries[i]
            if e.function == function and e.index == index:
                return e
        return None
