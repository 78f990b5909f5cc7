"""Memslot budgets: how many memslots a memory device may use, and keeping them free.

- ``MemslotBudget``: free memslots across every memslot consumer (KVM, later
  each vhost backend), minus what plugged memory devices have reserved, so
  that other memslot users (boot RAM, vhost) cannot take the slots a memory
  device may still need.
- ``memslots_for_device``: the heuristic of QEMU's separate-memslots RFC
  (``virtio_mem_decide_memslots``), the memslot size and count
  of one device from its share of the device-memory area.

- ``MemoryDeviceListener``: counts each memory device's memslots by
  listening to the memory layer, as QEMU's ``memory_devices_region_mod``
  does, so that devices report nothing.

No KVM calls: consumers are callables returning their free slots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from kvmmem.devices.memory_device import GiB, MemoryDeviceError, MemslotBudgetError, _check_int
from kvmmem.devices.virtio_mem_proto import is_power_of_two
from kvmmem.memory.address_space import MemoryListener
from kvmmem.memory.flatview import FlatRange
from kvmmem.memory.region import MemoryRegion

# The per-device memslot rules of QEMU's RFC (virtio_mem_decide_memslots).
MIN_MEMSLOT_SIZE = GiB
MAX_MEMSLOTS_PER_DEVICE = 1024


class Reservation(NamedTuple):
    """Memslots a memory device may need (``reserved``) and how many it has mapped (``used``).
    A named tuple: the memory listener replaces one on every memslot change."""

    reserved: int
    used: int = 0

    @property
    def outstanding(self) -> int:
        """Reserved slots not yet taken from the consumers: still to be kept free."""
        return max(0, self.reserved - self.used)


class MemslotBudget:
    """Free memslots across every memslot consumer, minus what memory devices have reserved.

    A consumer (KVM, later each vhost backend) is a callable returning its
    current number of free slots; slots already mapped by anyone are counted
    there. Memory devices reserve their worst case when plugged and report
    how many they have mapped; the difference stays off limits to everyone else.
    """

    def __init__(self, consumers: Mapping[str, Callable[[], int]] | None = None) -> None:
        self._consumers: dict[str, Callable[[], int]] = dict(consumers or {})
        self._reservations: dict[str, Reservation] = {}
        # Memslots each device has mapped now, kept apart from the reservations
        # because the memory listener changes it on every memslot change.
        self._used: dict[str, int] = {}

    @property
    def consumers(self) -> tuple[str, ...]:
        return tuple(self._consumers)

    @property
    def reservations(self) -> Mapping[str, Reservation]:
        return MappingProxyType({device_id: Reservation(r.reserved, self._used[device_id])
                                 for device_id, r in self._reservations.items()})

    def add_consumer(self, name: str, free_slots: Callable[[], int]) -> None:
        """Register a memslot consumer; refused if it cannot hold the slots memory devices reserved."""
        if name in self._consumers:
            raise MemslotBudgetError(f"memslot consumer '{name}' is already registered")
        free = self._read(name, free_slots)
        if free < self.outstanding:
            raise MemslotBudgetError(f"memslot consumer '{name}' has {free} free memslots, fewer than the "
                                     f"{self.outstanding} reserved for memory devices")
        self._consumers[name] = free_slots

    def remove_consumer(self, name: str) -> None:
        if self._consumers.pop(name, None) is None:
            raise MemslotBudgetError(f"memslot consumer '{name}' is not registered")

    def free(self) -> int:
        """Free slots right now: the minimum over all consumers."""
        if not self._consumers:
            raise MemslotBudgetError("no memslot consumer is registered: the free memslots are unknown")
        # a copy: a vhost back-end that disconnects is removed from another thread
        return min(self._read(name, fn) for name, fn in tuple(self._consumers.items()))

    @property
    def outstanding(self) -> int:
        """Slots reserved by memory devices and not yet mapped by them."""
        return sum(r.outstanding for r in self.reservations.values())

    def available(self) -> int:
        """Slots anyone may take now without eating into memory-device reservations."""
        return max(0, self.free() - self.outstanding)

    def check_available(self, user: str, count: int) -> None:
        """Refuse a non-memory-device user (boot RAM, vhost) that wants ``count`` more slots than it may take."""
        available = self.available()
        if count > available:
            raise MemslotBudgetError(f"{user} needs {count} memslots but only {available} may be taken: "
                                     f"{self.free()} are free and {self.outstanding} are reserved for "
                                     f"memory devices")

    def reserve(self, device_id: str, count: int) -> None:
        """Reserve ``count`` slots for a memory device being plugged."""
        _check_int("count", count)
        if count <= 0:
            raise MemslotBudgetError(f"memory device '{device_id}' must reserve at least one memslot, not {count}")
        if device_id in self._reservations:
            raise MemslotBudgetError(f"memory device '{device_id}' already holds a reservation of "
                                     f"{self._reservations[device_id].reserved} memslots")
        free, outstanding = self.free(), self.outstanding
        if count > free - outstanding:
            raise MemslotBudgetError(f"memory device '{device_id}' needs {count} memslots but only "
                                     f"{max(0, free - outstanding)} are available ({free} free, "
                                     f"{outstanding} reserved for other memory devices)")
        self._reservations[device_id] = Reservation(count)
        self._used[device_id] = 0

    def set_used(self, device_id: str, used: int) -> None:
        """Record how many of its reserved slots the device has mapped now
        (for memslots the memory listener does not see)."""
        reservation = self._reservations.get(device_id) or self._get(device_id)
        if type(used) is not int:
            _check_int("used", used)
        if not 0 <= used <= reservation.reserved:
            raise MemslotBudgetError(f"memory device '{device_id}' cannot use {used} memslots: it reserved "
                                     f"{reservation.reserved}")
        self._used[device_id] = used

    def release(self, device_id: str) -> Reservation:
        """Drop a device's reservation (the device is unplugged)."""
        reservation = self.reservations.get(device_id) or self._get(device_id)
        del self._reservations[device_id], self._used[device_id]
        return reservation

    def _get(self, device_id: str) -> Reservation:
        try:
            return self._reservations[device_id]
        except KeyError:
            raise MemslotBudgetError(f"memory device '{device_id}' holds no memslot reservation") from None

    @staticmethod
    def _read(name: str, fn: Callable[[], int]) -> int:
        free = fn()
        if not isinstance(free, int) or isinstance(free, bool) or free < 0:
            raise MemslotBudgetError(f"memslot consumer '{name}' reported {free!r} free memslots")
        return free


class MemoryDeviceListener(MemoryListener):
    """Counts the memslots of each memory device in an address space
    (QEMU's ``memory_devices_region_mod``, a listener of ``address_space_memory``).

    Every RAM flat range is one memslot; a range whose RAM region belongs to
    a tracked device counts for that device's reservation in ``budget``.
    Attach it after the KVM listener: when KVM refuses a memslot, the commit
    is rolled back before this listener sees the range.
    """

    def __init__(self, budget: MemslotBudget) -> None:
        self.budget = budget
        self._owners: dict[MemoryRegion, str] = {}
        self._used = budget._used       # same module: one dict update per memslot change

    def track(self, device_id: str, ram: MemoryRegion) -> None:
        """Count the flat ranges of ``ram`` as ``device_id``'s memslots."""
        self._owners[ram] = device_id

    def untrack(self, ram: MemoryRegion) -> None:
        self._owners.pop(ram, None)

    def region_add(self, fr: FlatRange) -> None:
        device_id = self._owners.get(fr.region)
        if device_id is not None:
            self._used[device_id] += 1

    def region_del(self, fr: FlatRange) -> None:
        device_id = self._owners.get(fr.region)
        if device_id is not None:
            self._used[device_id] -= 1


@dataclass(frozen=True)
class MemslotSplit:
    """How a device region is cut into memslots: ``count`` slots of ``memslot_size`` (the last may be short)."""

    memslot_size: int
    count: int
    limit: int


def memslots_for_device(device_size: int, block_size: int, area_size: int,
                        slots_for_memory_devices: int, max_memslots: int = 0) -> MemslotSplit:
    """The RFC's heuristic for the memslots of one device (QEMU's
    ``virtio_mem_decide_memslots``).

    The device gets a share of ``slots_for_memory_devices`` in proportion to
    its size in the device-memory area (at least 1), capped at 1024 and at
    ``max_memslots`` when that is not 0. Memslots are the smallest power-of-two
    multiple of ``block_size`` that is at least 1 GiB and keeps the count
    within that limit.
    """
    for name, value in (("device_size", device_size), ("block_size", block_size), ("area_size", area_size),
                        ("slots_for_memory_devices", slots_for_memory_devices),
                        ("max_memslots", max_memslots)):
        _check_int(name, value)
    if not is_power_of_two(block_size):
        raise MemoryDeviceError(f"block size {block_size:#x} is not a power of two")
    if device_size <= 0 or device_size % block_size:
        raise MemoryDeviceError(f"device size {device_size:#x} must be a positive multiple of the "
                                f"block size {block_size:#x}")
    if area_size < device_size:
        raise MemoryDeviceError(f"device of {device_size:#x} bytes does not fit the device-memory area "
                                f"of {area_size:#x} bytes")
    if slots_for_memory_devices < 0 or max_memslots < 0:
        raise MemoryDeviceError(f"memslot counts must not be negative (slots_for_memory_devices="
                                f"{slots_for_memory_devices}, max_memslots={max_memslots})")
    limit = max(1, slots_for_memory_devices * device_size // area_size)
    limit = min(limit, MAX_MEMSLOTS_PER_DEVICE)
    if max_memslots:
        limit = min(limit, max_memslots)
    memslot_size = block_size
    while memslot_size < MIN_MEMSLOT_SIZE or memslot_size * limit < device_size:
        memslot_size *= 2
    return MemslotSplit(memslot_size, -(-device_size // memslot_size), limit)
