"""Which memslots of a virtio-mem device must be mapped, and the plug bitmap that decides it.

A device region is cut into memslots of ``memslot_size`` bytes (the last one
may be shorter). The three modes map:

- ``single``: the whole region as one memslot (index 0), always;
- ``usable``: every memslot that intersects ``[0, usable_region_size)``;
- ``dynamic``: every memslot holding at least one plugged block.

``PlugBitmap`` keeps one byte per block plus a plugged-block counter per
memslot, so plugging or unplugging n blocks costs O(n) whatever the device
size (64 TiB of 2 MiB blocks is a 32 MiB bytearray), and reports which
memslots became populated or empty. A bytearray was chosen over a Python int
bitset because ints are immutable: every change to a 32M-bit int copies all
4 MiB of it (about 0.5 ms per request, against microseconds here).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Set
from dataclasses import dataclass
from enum import StrEnum

from kvmmem.devices.virtio_mem_proto import BlockState


class MemslotMode(StrEnum):
    """How a device's memory is mapped into KVM (the device's ``memslots`` property)."""

    SINGLE = "single"
    USABLE = "usable"
    DYNAMIC = "dynamic"


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _check_sizes(memslot_size: int, region_size: int) -> None:
    _check_int("memslot_size", memslot_size)
    _check_int("region_size", region_size)
    if memslot_size <= 0 or region_size <= 0:
        raise ValueError(f"memslot size {memslot_size:#x} and region size {region_size:#x} must be positive")


def memslot_count(memslot_size: int, region_size: int) -> int:
    """How many memslots cover the region (the last one may be short)."""
    _check_sizes(memslot_size, region_size)
    return -(-region_size // memslot_size)


def memslot_span(index: int, memslot_size: int, region_size: int) -> tuple[int, int]:
    """``(offset, size)`` of memslot ``index`` inside the region."""
    count = memslot_count(memslot_size, region_size)
    if not 0 <= _check_int("index", index) < count:
        raise ValueError(f"memslot index {index} is outside 0..{count - 1}")
    offset = index * memslot_size
    return offset, min(memslot_size, region_size - offset)


class PlugBitmap:
    """Plug state of every block of a device, with a plugged-block counter per memslot."""

    def __init__(self, nb_blocks: int, blocks_per_memslot: int) -> None:
        _check_int("nb_blocks", nb_blocks)
        _check_int("blocks_per_memslot", blocks_per_memslot)
        if nb_blocks <= 0 or blocks_per_memslot <= 0:
            raise ValueError(f"nb_blocks {nb_blocks} and blocks_per_memslot {blocks_per_memslot} "
                             f"must be positive")
        self._nb_blocks = nb_blocks
        self._per_slot = blocks_per_memslot
        self._bits = bytearray(nb_blocks)
        self._counts = array("Q", bytes(8 * -(-nb_blocks // blocks_per_memslot)))
        self._populated: set[int] = set()
        self._plugged = 0

    @property
    def nb_blocks(self) -> int:
        return self._nb_blocks

    @property
    def blocks_per_memslot(self) -> int:
        return self._per_slot

    @property
    def nb_memslots(self) -> int:
        return len(self._counts)

    @property
    def plugged_count(self) -> int:
        """Number of plugged blocks."""
        return self._plugged

    def memslot_blocks(self, index: int) -> tuple[int, int]:
        """``(first block, number of blocks)`` of memslot ``index``."""
        if not 0 <= _check_int("index", index) < len(self._counts):
            raise ValueError(f"memslot index {index} is outside 0..{len(self._counts) - 1}")
        first = index * self._per_slot
        return first, min(self._per_slot, self._nb_blocks - first)

    def memslot_plugged(self, index: int) -> int:
        """Plugged blocks inside memslot ``index``."""
        self.memslot_blocks(index)
        return self._counts[index]

    def populated_memslots(self) -> frozenset[int]:
        """Memslots holding at least one plugged block."""
        return frozenset(self._populated)

    def is_plugged(self, block: int) -> bool:
        self._check_range(block, 1)
        return bool(self._bits[block])

    def state(self, first: int, n: int) -> BlockState:
        """PLUGGED, UNPLUGGED or MIXED for blocks ``[first, first + n)``."""
        end = self._check_range(first, n)
        plugged = self._bits.count(1, first, end)
        if plugged == n:
            return BlockState.PLUGGED
        return BlockState.UNPLUGGED if plugged == 0 else BlockState.MIXED

    def any_in_state(self, first: int, n: int, plugged: bool) -> bool:
        """True if any block of ``[first, first + n)`` is plugged (or unplugged, for ``plugged=False``)."""
        end = self._check_range(first, n)
        return self._bits.find(1 if plugged else 0, first, end) != -1

    def find(self, plugged: bool, first: int = 0, end: int | None = None) -> int:
        """Index of the first block in ``[first, end)`` in that state, or -1."""
        end = self._nb_blocks if end is None else end
        if end <= first:
            return -1
        self._check_range(first, end - first)
        return self._bits.find(1 if plugged else 0, first, end)

    def rfind(self, plugged: bool, first: int = 0, end: int | None = None) -> int:
        """Index of the last block in ``[first, end)`` in that state, or -1."""
        end = self._nb_blocks if end is None else end
        if end <= first:
            return -1
        self._check_range(first, end - first)
        return self._bits.rfind(1 if plugged else 0, first, end)

    def plug(self, first: int, n: int) -> tuple[int, ...]:
        """Mark blocks plugged; return the memslots that went from empty to populated."""
        return self._set(first, n, 1)

    def unplug(self, first: int, n: int) -> tuple[int, ...]:
        """Mark blocks unplugged; return the memslots that became empty."""
        return self._set(first, n, 0)

    def clear(self) -> tuple[int, ...]:
        """Unplug everything (cost follows the populated memslots); return the memslots that became empty."""
        emptied = tuple(sorted(self._populated))
        for index in emptied:
            first, n = self.memslot_blocks(index)
            self._bits[first:first + n] = bytes(n)
            self._counts[index] = 0
        self._populated.clear()
        self._plugged = 0
        return emptied

    def plugged_runs(self, first: int = 0, n: int | None = None) -> Iterator[tuple[int, int]]:
        """Yield ``(first block, length)`` of each maximal plugged run inside ``[first, first + n)``."""
        end = self._check_range(first, self._nb_blocks - first if n is None else n)
        pos = first
        while pos < end:
            start = self._bits.find(1, pos, end)
            if start == -1:
                return
            stop = self._bits.find(0, start, end)
            stop = end if stop == -1 else stop
            yield start, stop - start
            pos = stop

    def _set(self, first: int, n: int, value: int) -> tuple[int, ...]:
        end = self._check_range(first, n)
        bits, counts, per_slot = self._bits, self._counts, self._per_slot
        changed_slots: list[int] = []
        for index in range(first // per_slot, (end - 1) // per_slot + 1):
            lo = max(first, index * per_slot)
            hi = min(end, lo - lo % per_slot + per_slot)
            # blocks in [lo, hi) that are not yet in the target state
            changes = bits.count(1 - value, lo, hi)
            if not changes:
                continue
            before = counts[index]
            after = before + changes if value else before - changes
            counts[index] = after
            if before == 0 or after == 0:
                changed_slots.append(index)
                if after:
                    self._populated.add(index)
                else:
                    self._populated.discard(index)
            self._plugged += changes if value else -changes
        bits[first:end] = (b"\x01" if value else b"\x00") * n
        return tuple(changed_slots)

    def _check_range(self, first: int, n: int) -> int:
        if type(first) is not int or type(n) is not int:     # exact ints pass at once
            _check_int("first", first)
            _check_int("n", n)
        if n <= 0 or first < 0 or first + n > self._nb_blocks:
            raise ValueError(f"block range [{first}, {first + n}) is empty or outside the "
                             f"{self._nb_blocks} blocks of the device")
        return first + n


_FIRST_ONLY = frozenset({0})


def memslots_to_map(mode: MemslotMode | str, memslot_size: int, region_size: int,
                    usable_region_size: int, bitmap: PlugBitmap | None = None) -> frozenset[int]:
    """Indices of the memslots that must be mapped now.

    ``single``: {0}, memslot 0 being the whole region (``memslot_size`` and
    ``bitmap`` are not used). ``usable``: memslots intersecting the usable
    region. ``dynamic``: memslots holding a plugged block, from ``bitmap``,
    whose geometry must match ``memslot_size`` and ``region_size``.
    """
    mode = MemslotMode(mode)
    _check_sizes(memslot_size, region_size)
    _check_int("usable_region_size", usable_region_size)
    if not 0 <= usable_region_size <= region_size:
        raise ValueError(f"usable region size {usable_region_size:#x} is outside 0..{region_size:#x}")
    if mode is MemslotMode.DYNAMIC and bitmap is not None and (
            region_size % bitmap.nb_blocks
            or (region_size // bitmap.nb_blocks) * bitmap.blocks_per_memslot != memslot_size):
        raise ValueError(f"bitmap of {bitmap.nb_blocks} blocks, {bitmap.blocks_per_memslot} per memslot, "
                         f"does not match region size {region_size:#x} and memslot size {memslot_size:#x}")
    return frozenset(wanted_memslots(mode, memslot_size, usable_region_size, bitmap))


def wanted_memslots(mode: MemslotMode, memslot_size: int, usable_region_size: int,
                    bitmap: PlugBitmap | None) -> Set[int]:
    """:func:`memslots_to_map` without its argument checks, for the device,
    whose geometry is fixed and consistent from the start (it runs on every
    request). In dynamic mode the answer is the bitmap's own set of populated
    memslots, not a copy: read it before the next plug or unplug."""
    if mode is MemslotMode.SINGLE:
        return _FIRST_ONLY
    if mode is MemslotMode.USABLE:
        return frozenset(range(-(-usable_region_size // memslot_size)))
    if bitmap is None:
        raise ValueError("dynamic mode needs the plug bitmap")
    return bitmap._populated


@dataclass(frozen=True)
class MemslotChanges:
    """What to do to go from the mapped memslots to the wanted ones: unmap first, then map."""

    unmap: tuple[int, ...]
    map: tuple[int, ...]


def plan_changes(mapped: Set[int], wanted: Set[int]) -> MemslotChanges:
    """Memslots to unmap (mapped, not wanted) and to map (wanted, not mapped), each sorted."""
    return MemslotChanges(tuple(sorted(mapped - wanted)), tuple(sorted(wanted - mapped)))
