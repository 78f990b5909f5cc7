"""The properties of a virtio-mem device, named and checked as QEMU's."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from kvmmem.devices.memslot_policy import MemslotMode
from kvmmem.devices.virtio_mem_proto import is_power_of_two
from kvmmem.memory.host import HostMemory

MiB = 1 << 20
MIN_BLOCK_SIZE = MiB
DEFAULT_MERGE_DELAY_MS = 100
MAX_MERGE_DELAY_MS = 3_600_000
THP_SIZE_FILE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")


class ProtectMode(StrEnum):
    """What of the unplugged memory the guest cannot reach.

    ``slot``: memory outside mapped memslots (it has no memslot).
    ``block``: also every unplugged block inside a mapped memslot (its host
    pages are guard-protected), so only plugged blocks are reachable.
    """

    SLOT = "slot"
    BLOCK = "block"


class VirtioMemPropertyError(ValueError):
    """A property value the device cannot take; nothing was changed."""


def default_block_size() -> int:
    """The host's THP size (2 MiB on x86), at least 1 MiB."""
    try:
        thp = int(THP_SIZE_FILE.read_text())
    except (OSError, ValueError):
        thp = 2 * MiB
    return max(thp, MIN_BLOCK_SIZE) if is_power_of_two(thp) else 2 * MiB


@dataclass
class VirtioMemProps:
    """Device properties; ``qemu_name`` of each field is its QEMU spelling."""

    id: str
    memdev: HostMemory | None = None
    size: int | None = None
    block_size: int = 0
    requested_size: int = 0
    node: int = 0
    memaddr: int | None = None
    prealloc: bool = False
    unplugged_inaccessible: bool = True
    max_memslots: int = 0
    memslots: MemslotMode = MemslotMode.DYNAMIC
    protect: ProtectMode = ProtectMode.SLOT
    merge_delay: int = DEFAULT_MERGE_DELAY_MS
    """``memslots=exact``: milliseconds without a plug before deferred merges
    run (:meth:`VirtioMem.merge_memslots`); 0 merges on the request path."""

    def __post_init__(self) -> None:
        self.memslots = _enum(MemslotMode, "memslots", self.memslots)
        self.protect = _enum(ProtectMode, "protect", self.protect)
        if not self.block_size:
            self.block_size = default_block_size()
        self.validate()

    @property
    def region_size(self) -> int:
        return self.memdev.size if self.memdev is not None else int(self.size or 0)

    def validate(self) -> None:
        """Refuse combinations QEMU refuses, each with the reason."""
        bs = self.block_size
        if not isinstance(self.id, str) or not self.id:
            raise VirtioMemPropertyError("virtio-mem needs an 'id'")
        if self.memdev is None and not self.size:
            raise VirtioMemPropertyError(f"{self.id}: give 'memdev' (a HostMemory) or 'size'")
        if self.memdev is not None and self.size not in (None, self.memdev.size):
            raise VirtioMemPropertyError(f"{self.id}: 'size' {self.size:#x} differs from memdev "
                                         f"{self.memdev.name!r} of {self.memdev.size:#x} bytes")
        if not is_power_of_two(bs) or bs < MIN_BLOCK_SIZE or bs < mmap.PAGESIZE:
            raise VirtioMemPropertyError(f"{self.id}: 'block-size' {bs:#x} must be a power of two "
                                         f"of at least 1 MiB and the page size")
        size = self.region_size
        if size <= 0 or size % bs:
            raise VirtioMemPropertyError(f"{self.id}: region size {size:#x} must be a positive "
                                         f"multiple of 'block-size' {bs:#x}")
        check_requested_size(self.id, self.requested_size, size, bs)
        if self.memaddr is not None and self.memaddr % bs:
            raise VirtioMemPropertyError(f"{self.id}: 'memaddr' {self.memaddr:#x} is not aligned "
                                         f"to 'block-size' {bs:#x}")
        if not 0 <= self.node <= 0xFFFF:
            raise VirtioMemPropertyError(f"{self.id}: 'node' {self.node} is not a u16")
        delay = self.merge_delay
        if not isinstance(delay, int) or isinstance(delay, bool) \
                or not 0 <= delay <= MAX_MERGE_DELAY_MS:
            raise VirtioMemPropertyError(f"{self.id}: 'merge-delay' {delay!r} must be 0.."
                                         f"{MAX_MERGE_DELAY_MS} milliseconds")
        if self.max_memslots < 0:
            raise VirtioMemPropertyError(f"{self.id}: 'max-memslots' must not be negative")
        if self.memslots in (MemslotMode.DYNAMIC, MemslotMode.EXACT) \
                and not self.unplugged_inaccessible:
            raise VirtioMemPropertyError(f"{self.id}: 'memslots={self.memslots.value}' needs "
                                         "'unplugged-inaccessible=on' (the guest must not touch "
                                         "unplugged memory that has no memslot)")
        if self.protect is ProtectMode.BLOCK and self.memslots is MemslotMode.SINGLE:
            raise VirtioMemPropertyError(f"{self.id}: 'protect=block' needs 'memslots=usable', "
                                         "'dynamic' or 'exact': in single mode every unplugged "
                                         "block of the whole region would need guard page tables")
        if self.protect is ProtectMode.BLOCK and not self.unplugged_inaccessible:
            raise VirtioMemPropertyError(f"{self.id}: 'protect=block' needs "
                                         "'unplugged-inaccessible=on'")

    @classmethod
    def from_qemu(cls, options: dict[str, Any]) -> VirtioMemProps:
        """Build from QEMU-spelled names (``block-size``, ``requested-size``...)."""
        known = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        kwargs = {}
        for key, value in options.items():
            if key not in known:
                raise VirtioMemPropertyError(f"virtio-mem has no property {key!r}")
            kwargs[known[key]] = value
        if kwargs.get("block_size", MIN_BLOCK_SIZE) == 0:      # 0 is only the API's "default"
            raise VirtioMemPropertyError(f"'block-size' property has to be at least "
                                         f"{MIN_BLOCK_SIZE:#x}")  # virtio_mem_set_block_size
        return cls(**kwargs)


def check_requested_size(dev_id: str, requested: int, region_size: int, block_size: int) -> None:
    """'requested-size' must be a block multiple inside the region."""
    if not isinstance(requested, int) or isinstance(requested, bool):
        raise VirtioMemPropertyError(f"{dev_id}: 'requested-size' must be an integer")
    if requested < 0 or requested % block_size:
        raise VirtioMemPropertyError(f"{dev_id}: 'requested-size' {requested:#x} is not a "
                                     f"multiple of 'block-size' {block_size:#x}")
    if requested > region_size:
        raise VirtioMemPropertyError(f"{dev_id}: 'requested-size' {requested:#x} exceeds the "
                                     f"region size {region_size:#x}")


def _enum(kind: type[StrEnum], name: str, value: object) -> Any:
    if isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            pass
    choices = ", ".join(m.value for m in kind)
    raise VirtioMemPropertyError(f"'{name}' must be one of {choices}, not {value!r}")
