"""Where memory devices live: the device-memory area.

``DeviceMemory`` hands out guest-physical ranges of a machine's
``device-memory`` area (:mod:`kvmmem.vmm.pc_layout` places it) to memory
devices, first fit or at an explicit ``memaddr``, takes them back, and
answers which device owns an address (QEMU's hw/mem/memory-device.c).

How many memslots a memory device may use, and the reservations that keep
them free, are in :mod:`kvmmem.devices.memslot_budget`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmmem.devices.virtio_mem_proto import align_up, is_power_of_two

GiB = 1 << 30


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

    def owner(self, addr: int) -> str | None:
        """The id of the device whose range holds ``addr``, if any."""
        return next((d.device_id for d in self._devices.values() if d.addr <= addr < d.end), None)

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
