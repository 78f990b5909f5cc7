"""The plug state of a virtio-mem device's blocks: one byte per block.

A plain bitmap (QEMU's ``VirtIOMEM.bitmap``): it knows blocks, not memslots.
A bytearray rather than a Python int bitset because ints are immutable:
every change to a 32M-bit int would copy all of it, while here setting n
blocks costs O(n) and the scans (``bytes.find``, ``bytes.count``) run in C.
64 TiB of 2 MiB blocks is a 32 MiB bytearray.
"""

from __future__ import annotations

from collections.abc import Iterator

from kvmmem.devices.virtio_mem_proto import BlockState


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


class PlugBitmap:
    """Plug state of every block of a device, and how many are plugged."""

    def __init__(self, nb_blocks: int) -> None:
        _check_int("nb_blocks", nb_blocks)
        if nb_blocks <= 0:
            raise ValueError(f"nb_blocks {nb_blocks} must be positive")
        self._nb_blocks = nb_blocks
        self._bits = bytearray(nb_blocks)
        self.plugged_count = 0
        """Number of plugged blocks (read it; ``set`` and ``clear`` keep it)."""

    @property
    def nb_blocks(self) -> int:
        return self._nb_blocks

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
        end = first + n
        if type(first) is not int or type(n) is not int or n <= 0 or first < 0 \
                or end > self._nb_blocks:
            self._check_range(first, n)                   # raises
        return self._bits.find(1 if plugged else 0, first, end) != -1

    def count(self, first: int, n: int) -> int:
        """Plugged blocks inside ``[first, first + n)``."""
        end = self._check_range(first, n)
        return self._bits.count(1, first, end)

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

    def set(self, first: int, n: int, plugged: bool) -> int:
        """Put blocks ``[first, first + n)`` in a state; return how many changed."""
        end = first + n
        if type(first) is not int or type(n) is not int or n <= 0 or first < 0 \
                or end > self._nb_blocks:
            self._check_range(first, n)                   # raises
        bits = self._bits
        changes = bits.count(0 if plugged else 1, first, end)
        if changes:
            bits[first:end] = (b"\x01" if plugged else b"\x00") * n
            self.plugged_count += changes if plugged else -changes
        return changes

    def clear(self, runs: list[tuple[int, int]] | None = None) -> None:
        """Unplug everything; ``runs`` (the plugged runs, when the caller
        has them) limits the writes to them."""
        if runs is None:
            self._bits = bytearray(self._nb_blocks)
        else:
            for first, n in runs:
                self._bits[first:first + n] = bytes(n)
        self.plugged_count = 0

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

    def _check_range(self, first: int, n: int) -> int:
        if type(first) is not int or type(n) is not int:     # exact ints pass at once
            _check_int("first", first)
            _check_int("n", n)
        if n <= 0 or first < 0 or first + n > self._nb_blocks:
            raise ValueError(f"block range [{first}, {first + n}) is empty or outside the "
                             f"{self._nb_blocks} blocks of the device")
        return first + n
