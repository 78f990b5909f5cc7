"""The guest-physical memory layout of the pc machine, in one place.

:class:`MachineMemoryMap` lays out RAM and the ``device-memory`` area as
QEMU's pc machine does for ``-m ram,maxmem=..,slots=..`` (``pc_memory_init``
in hw/i386/pc.c): RAM up to 3 GiB below 4 GiB (the rest of the space below
4 GiB is the PCI hole), the remainder from 4 GiB, and device memory 1 GiB
aligned above it with 1 GiB of slack per slot.  The region tree
(:mod:`kvmmem.vmm.machine_memory`), the e820 map and the identity page
tables of the loader (:mod:`kvmmem.vmm.boot`) all derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.devices.memory_device import GiB, MemoryDeviceError, MemoryRange, _check_int
from kvmmem.devices.virtio_mem_proto import align_up
from kvmmem.memory.host import PAGE_SIZE
from kvmmem.vmm.boot import E820_RAM, LOW_RAM_END, MIB, BootError

__all__ = ["BELOW_4G_MAX", "DEVICE_MEMORY_ALIGN", "FOUR_GIB", "MAX_SLOTS", "SLOT_SLACK",
           "MachineMemoryMap", "RamRange"]

FOUR_GIB = 4 * GiB
# pc machine: RAM below 4 GiB stops at 3 GiB, leaving room for the PCI hole.
BELOW_4G_MAX = 3 * GiB
# Device-memory starts 1 GiB aligned; each slot adds 1 GiB so DIMMs can be aligned.
DEVICE_MEMORY_ALIGN = GiB
SLOT_SLACK = GiB
# ACPI limits the pc machine to 256 memory slots.
MAX_SLOTS = 256


@dataclass(frozen=True)
class RamRange:
    """Where a piece of boot RAM (``pc.ram``) shows in the guest: ``range``
    is backed by ``pc.ram`` from ``ram_offset`` on."""

    range: MemoryRange
    ram_offset: int


@dataclass(frozen=True)
class MachineMemoryMap:
    """Guest-physical layout of a pc machine started with ``-m ram_size,maxmem=..,slots=..``."""

    ram_size: int
    maxmem: int | None = None
    slots: int = 0

    def __post_init__(self) -> None:
        ram = _check_int("ram_size", self.ram_size)
        slots = _check_int("slots", self.slots)
        if ram <= 0 or ram % PAGE_SIZE:
            raise MemoryDeviceError(f"ram size {ram:#x} must be a positive multiple of the "
                                    f"{PAGE_SIZE:#x}-byte page size")
        if not 0 <= slots <= MAX_SLOTS:
            raise MemoryDeviceError(f"slots={slots} is outside 0..{MAX_SLOTS}, the pc machine's limit")
        if self.maxmem is None:
            if slots:
                raise MemoryDeviceError(f"slots={slots} needs maxmem: without it there is no "
                                        f"device-memory area for the slots")
            return
        maxmem = _check_int("maxmem", self.maxmem)
        if maxmem % PAGE_SIZE:
            raise MemoryDeviceError(f"maxmem {maxmem:#x} is not a multiple of the {PAGE_SIZE:#x}-byte page size")
        if maxmem < ram:
            raise MemoryDeviceError(f"maxmem {maxmem:#x} is below the ram size {ram:#x}")
        if maxmem == ram and slots:
            raise MemoryDeviceError(f"slots={slots} but maxmem equals the ram size {ram:#x}: "
                                    f"raise maxmem to leave room for memory devices")

    @property
    def ram_below_4g(self) -> MemoryRange:
        return MemoryRange("ram-below-4g", 0, min(self.ram_size, BELOW_4G_MAX))

    @property
    def ram_above_4g(self) -> MemoryRange | None:
        size = self.ram_size - self.ram_below_4g.size
        return MemoryRange("ram-above-4g", FOUR_GIB, size) if size else None

    @property
    def device_memory(self) -> MemoryRange | None:
        """The ``device-memory`` area, or None when the machine has no maxmem beyond its RAM."""
        if self.maxmem is None:
            return None
        size = self.maxmem - self.ram_size + SLOT_SLACK * self.slots
        if size == 0:
            return None
        high = self.ram_above_4g
        start = align_up(high.end if high else FOUR_GIB, DEVICE_MEMORY_ALIGN)
        return MemoryRange("device-memory", start, size)

    def regions(self) -> tuple[MemoryRange, ...]:
        """Every range of the map, by address."""
        found = (self.ram_below_4g, self.ram_above_4g, self.device_memory)
        return tuple(r for r in found if r is not None)

    def boot_ram(self) -> tuple[RamRange, ...]:
        """The guest ranges of boot RAM, each with its offset in ``pc.ram``."""
        below, above = self.ram_below_4g, self.ram_above_4g
        return (RamRange(below, 0),) + ((RamRange(above, below.size),) if above else ())

    def e820(self) -> list[tuple[int, int, int]]:
        """The e820 RAM map the loader hands to the kernel: conventional
        memory, RAM from 1 MiB to the end of RAM below 4 GiB, and RAM from
        4 GiB (what SeaBIOS reports for QEMU's pc machine)."""
        below = self.ram_below_4g.size
        above = self.ram_above_4g.size if self.ram_above_4g else 0
        if below < 2 * MIB:
            raise BootError(f"RAM below 4 GiB ({below:#x}) must be 2 MiB to 4 GiB "
                            f"and RAM above it ({above:#x}) not negative")
        e820 = [(0, LOW_RAM_END, E820_RAM), (MIB, below - MIB, E820_RAM)]
        if above:
            e820.append((FOUR_GIB, above, E820_RAM))
        return e820

    @property
    def identity_map_end(self) -> int:
        """Where the loader's identity map of guest memory ends: all boot RAM
        and at least the 4 GiB below the MMIO window's end. Device memory is
        not in it: a kernel maps what it plugs (Linux builds its own page
        tables; the test guest maps on a page fault), so the boot page tables
        and the RAM they take do not grow with maxmem."""
        high = self.ram_above_4g
        return max(FOUR_GIB, high.end if high else 0)

    @property
    def end(self) -> int:
        """Where the memory map ends: RAM, or device memory above it."""
        return max([FOUR_GIB] + [r.end for r in self.regions()])
