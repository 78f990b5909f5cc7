"""How much KVM metadata a memory device's memslots cost, and the limit a
machine puts on it (``-machine memslot-metadata-limit=SIZE``).

KVM keeps per-memslot metadata proportional to the memslot's size (the
reverse maps and large-page tables of ``kvm_arch_prepare_memory_region``,
and on a shadow-MMU host more), whether or not the guest uses the memory.
Measured on the project's machines: 2566 MiB for one 1 TiB memslot, so
about 2.5 MiB per GiB, plus about 20 KiB for each memslot. A ``single``
device pays for its whole region, a ``usable`` one for the memslots over
its usable region; a ``dynamic`` one maps every memslot holding a plugged
block, whole. The guest decides where it plugs: anywhere in the usable
region (``requested-size`` plus the usable extent, and never less than the
usable region is now), at most ``requested-size`` worth of blocks, so the
estimate is what the guest can reach that way, not what was requested: as
many memslots as the usable region touches, but no more than there are
blocks to plug, each block in a memslot of its own. ``exact`` maps less,
but past its budget it maps what ``dynamic`` does, so it gets the same
bound. A device the guest keeps larger than asked (it ignores a shrink)
costs what it maps now until the guest gives the memory back.

The machine refuses a device, or a larger ``requested-size``, that would
take the estimate of all its devices over the limit, before anything is
changed. The default limit is a quarter of the host's memory (MemTotal).
"""

from __future__ import annotations

from pathlib import Path

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem_proto import usable_region_size

GIB = 1 << 30
MIB = 1 << 20
PER_GIB = 5 * MIB // 2           # 2.5 MiB of metadata per GiB of memslot
PER_MEMSLOT = 20 << 10           # and 20 KiB per memslot
DEFAULT_SHARE = 4                # the default limit: MemTotal / 4
MEMINFO = Path("/proc/meminfo")


def metadata_estimate(mapped: int, memslots: int) -> int:
    """Bytes of KVM metadata for ``memslots`` memslots of ``mapped`` bytes in all."""
    return -(-mapped * PER_GIB // GIB) + memslots * PER_MEMSLOT


def device_estimate(mode: MemslotMode, region_size: int, block_size: int, memslot_size: int,
                    requested_size: int, usable_now: int = 0,
                    mapped_now: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    """(metadata bytes, bytes mapped, memslots) a device at ``requested_size``
    can come to, whatever the guest plugs; ``usable_now`` is its usable region
    now (it never shrinks on a resize), ``mapped_now`` (bytes, memslots) what
    it maps now (a guest may keep it)."""
    if mode is MemslotMode.SINGLE:
        return metadata_estimate(region_size, 1), region_size, 1
    span = max(usable_now, usable_region_size(region_size, requested_size, block_size))
    memslots = -(-span // memslot_size)
    if mode is not MemslotMode.USABLE:       # a memslot is mapped only with a block in it
        memslots = min(memslots, requested_size // block_size)
    mapped = min(memslots * memslot_size, region_size)
    if metadata_estimate(*mapped_now) > metadata_estimate(mapped, memslots):
        mapped, memslots = mapped_now
    return metadata_estimate(mapped, memslots), mapped, memslots


def default_limit(meminfo: Path = MEMINFO) -> int:
    """A quarter of MemTotal (no limit if /proc/meminfo cannot tell)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 // DEFAULT_SHARE
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 64


def refusal(dev_id: str, what: str, estimate: tuple[int, int, int], others: int,
            limit: int, mode: MemslotMode | None = None) -> str:
    """Why a device (or a requested-size) is refused, in one sentence; the
    ways out offered are those a device in ``mode`` has not taken yet."""
    cost, mapped, memslots = estimate
    dynamic = "" if mode is MemslotMode.DYNAMIC else "use memslots=dynamic, "
    return (f"{dev_id}: {what} would map {mapped / GIB:g} GiB in {memslots} memslot(s), about "
            f"{cost / MIB:.1f} MiB of KVM metadata; with the other devices' {others / MIB:.1f} "
            f"MiB that exceeds memslot-metadata-limit={limit / MIB:.1f} MiB ({dynamic}"
            "a smaller requested-size, or raise -machine memslot-metadata-limit)")
