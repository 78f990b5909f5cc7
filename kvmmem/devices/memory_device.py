"""Where memory devices live: the pc machine's memory map, the device-memory area and memslot budgets.

Two small models, no KVM calls:

- ``MachineMemoryMap``: RAM below and above 4 GiB and the ``device-memory``
  area, laid out as QEMU's pc machine does for ``-m ram,maxmem=..,slots=..``.
- ``DeviceMemory``: hands out guest-physical ranges in that area to memory
  devices (first fit or an explicit ``memaddr``) and takes them back.

How many memslots a memory device may use, and the reservations that keep
them free, are in :mod:`kvmmem.devices.memslot_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.devices.virtio_mem_proto import align_up, is_power_of_two

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

PAGE_SIZE = 4 * KiB
FOUR_GIB = 4 * GiB
# pc machine: RAM below 4 GiB stops at 3 GiB, leaving room for the PCI hole.
BELOW_4G_MAX = 3 * GiB
# Device-memory starts 1 GiB aligned; each slot adds 1 GiB so DIMMs can be aligned.
DEVICE_MEMORY_ALIGN = GiB
SLOT_SLACK = GiB
# ACPI limits the pc machine to 256 memory slots.
MAX_SLOTS = 256


class MemoryDeviceError(ValueError):
    """A memory device or machine layout request that cannot be satisfied; nothing was changed."""


class MemslotBudgetError(MemoryDeviceError):
    """Not enough memslots for what was asked; nothing was changed."""


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _span(start: int, size: int) -> str:
    return f"[{start:#x}-{start + size - 1:#x}]"


@dataclass(frozen=True)
class MemoryRange:
    """A named guest-physical range ``[start, start + size)``."""

    name: str
    start: int
    size: int

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.start + self.size

    @property
    def last(self) -> int:
        """Last address inside the range (what ``info mtree`` prints)."""
        return self.start + self.size - 1

    def contains(self, start: int, size: int) -> bool:
        return self.start <= start and start + size <= self.end

    def overlaps(self, start: int, size: int) -> bool:
        return start < self.end and self.start < start + size


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


@dataclass(frozen=True)
class PluggedDevice:
    """A memory device's place in the device-memory area."""

    device_id: str
    addr: int
    size: int
    align: int

    @property
    def end(self) -> int:
        return self.addr + self.size


class DeviceMemory:
    """Hands out ranges of the device-memory area to memory devices."""

    def __init__(self, area: MemoryRange | None) -> None:
        self._area = area
        self._devices: dict[str, PluggedDevice] = {}

    @classmethod
    def for_machine(cls, machine: MachineMemoryMap) -> DeviceMemory:
        return cls(machine.device_memory)

    @property
    def area(self) -> MemoryRange | None:
        return self._area

    @property
    def devices(self) -> tuple[PluggedDevice, ...]:
        """Plugged devices by address."""
        return tuple(sorted(self._devices.values(), key=lambda d: d.addr))

    def get(self, device_id: str) -> PluggedDevice | None:
        return self._devices.get(device_id)

    @property
    def used_size(self) -> int:
        return sum(d.size for d in self._devices.values())

    def plug(self, device_id: str, size: int, align: int, memaddr: int | None = None) -> int:
        """Place a device of ``size`` bytes and return its address.

        Without ``memaddr`` the lowest free address aligned to ``align`` is
        taken; with it, exactly that address. Raises MemoryDeviceError and
        changes nothing when the device cannot be placed.
        """
        area = self._usable_area()
        self._check_new(device_id, size, align)
        if size > area.size:
            raise MemoryDeviceError(f"memory device '{device_id}' of {size:#x} bytes is larger than the "
                                    f"device-memory area {_span(area.start, area.size)} of {area.size:#x} "
                                    f"bytes: raise maxmem")
        left = area.size - self.used_size
        if size > left:
            raise MemoryDeviceError(f"memory device '{device_id}' needs {size:#x} bytes but only {left:#x} "
                                    f"of the {area.size:#x}-byte device-memory area are free")
        addr = self._first_fit(size, align) if memaddr is None else self._check_memaddr(
            device_id, memaddr, size, align)
        if addr is None:
            raise MemoryDeviceError(f"no free range of {size:#x} bytes aligned to {align:#x} for memory "
                                    f"device '{device_id}': the free {left:#x} bytes of the device-memory "
                                    f"area are fragmented")
        self._devices[device_id] = PluggedDevice(device_id, addr, size, align)
        return addr

    def unplug(self, device_id: str) -> PluggedDevice:
        """Free the device's range; MemoryDeviceError if it is not plugged."""
        try:
            return self._devices.pop(device_id)
        except KeyError:
            raise MemoryDeviceError(f"memory device '{device_id}' is not plugged") from None

    def _usable_area(self) -> MemoryRange:
        if self._area is None:
            raise MemoryDeviceError("the machine has no device-memory area: start it with maxmem "
                                    "above the ram size to plug memory devices")
        return self._area

    def _check_new(self, device_id: str, size: int, align: int) -> None:
        if not isinstance(device_id, str) or not device_id:
            raise MemoryDeviceError(f"memory device id {device_id!r} must be a non-empty string")
        _check_int("size", size)
        _check_int("align", align)
        if device_id in self._devices:
            d = self._devices[device_id]
            raise MemoryDeviceError(f"memory device '{device_id}' is already plugged at {_span(d.addr, d.size)}")
        if not is_power_of_two(align):
            raise MemoryDeviceError(f"alignment {align:#x} of memory device '{device_id}' is not a power of two")
        if size <= 0 or size % align:
            raise MemoryDeviceError(f"size {size:#x} of memory device '{device_id}' must be a positive "
                                    f"multiple of its alignment {align:#x}")

    def _check_memaddr(self, device_id: str, memaddr: int, size: int, align: int) -> int:
        _check_int("memaddr", memaddr)
        area = self._usable_area()
        if memaddr % align:
            raise MemoryDeviceError(f"memaddr {memaddr:#x} of memory device '{device_id}' is not aligned "
                                    f"to its alignment {align:#x}")
        if not area.contains(memaddr, size):
            raise MemoryDeviceError(f"memory device '{device_id}' at {_span(memaddr, size)} does not fit "
                                    f"the device-memory area {_span(area.start, area.size)}")
        for other in self.devices:
            if memaddr < other.end and other.addr < memaddr + size:
                raise MemoryDeviceError(f"memory device '{device_id}' at {_span(memaddr, size)} overlaps "
                                        f"memory device '{other.device_id}' at {_span(other.addr, other.size)}")
        return memaddr

    def _first_fit(self, size: int, align: int) -> int | None:
        area = self._usable_area()
        candidate = align_up(area.start, align)
        for other in self.devices:
            if candidate + size <= other.addr:
                break
            candidate = max(candidate, align_up(other.end, align))
        return candidate if candidate + size <= area.end else None
