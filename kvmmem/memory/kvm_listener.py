"""The KVM memslot listener: every RAM flat range is exactly one KVM memslot.

Attached to the system address space, it turns flat view changes into
``KVM_SET_USER_MEMORY_REGION`` calls: ``region_add`` of a RAM range creates
one slot, ``region_del`` deletes exactly the slot of that range, I/O ranges
get none (guest accesses there exit as MMIO).  Since unchanged ranges are
never reported, mapping one more unmergeable alias costs one ioctl.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmmem.memory.address_space import AddressSpace, MemoryListener
from kvmmem.memory.dirty_log import DirtyLog
from kvmmem.memory.flatview import FlatRange
from kvmmem.memory.host import PAGE_SIZE
from kvmmem.memory.region import RegionKind

if TYPE_CHECKING:
    from kvmmem.kvm import Vm

__all__ = ["KvmMemoryListener", "MemslotRecord", "KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY"]

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0   # linux/kvm.h; KVM logs the slot's guest writes
KVM_MEM_READONLY = 1 << 1      # linux/kvm.h; guest writes exit as MMIO
CLEAR_CHUNK = 1 << 18          # pages per KVM_CLEAR_DIRTY_LOG: 1 GiB, a multiple of 64
_RAM = RegionKind.RAM


@dataclass(frozen=True, slots=True)
class MemslotRecord:
    """One memslot this listener created, and what it maps."""

    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    flags: int
    region: str                 # the RAM region (e.g. "mem0")
    alias: str | None           # the alias it was mapped through (e.g. "virtio-mem-memslot-3")

    @property
    def guest_end(self) -> int:
        return self.guest_phys_addr + self.memory_size


class KvmMemoryListener(MemoryListener):
    """Keeps a VM's memslots equal to the RAM ranges of one address space."""

    accel_name = "KVM"           # what `info mtree -f` prints on mapped ranges

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        # fr.start -> (fr, slot id). What the slot maps (guest range, host
        # address, flags) is in the one memslot table, the VM's
        # (``Vm.memslots``); the MemslotRecords are built when asked for.
        self._by_start: dict[int, tuple[FlatRange, int]] = {}
        # Slots freed in the current bracket, so that an undo re-creates a
        # range under its old id (a rollback leaves KVM exactly as it was).
        self._freed: dict[FlatRange, int] = {}
        self._dirty: DirtyLog | None = None
        self._manual_protect = False
        self.pause_vcpus: Callable[[], AbstractContextManager[object]] = nullcontext
        """What keeps the VM's vCPUs out of guest code (QEMU's ``pause_all_vcpus``):
        the machine that runs them installs its gate; no-op where none run."""

    def quiesced(self) -> AbstractContextManager[object]:
        """KVM's side of a memslot replacement: no vCPU runs meanwhile."""
        return self.pause_vcpus()

    # -- dirty logging (QEMU's log_global_start / log_sync / log_global_stop) ----

    def start_dirty_log(self, log: DirtyLog) -> None:
        """Log the guest's writes to every memslot this listener holds, and to
        every one it creates from now on, into ``log`` (at :meth:`sync_dirty_log`,
        and when a logged memslot is deleted). Manual protection is turned on
        once per VM: a sync write-protects again only the pages it reports."""
        if self._dirty is not None:
            raise RuntimeError("dirty logging is already on")
        if not self._manual_protect:
            self.vm.enable_manual_dirty_log()
            self._manual_protect = True
        done = []
        try:
            for _, slot in self._by_start.values():
                self.vm.set_memslot_flags(slot, self.vm.memslots[slot].flags
                                          | KVM_MEM_LOG_DIRTY_PAGES)
                done.append(slot)
        except BaseException:
            for slot in done:
                self.vm.set_memslot_flags(slot, self.vm.memslots[slot].flags
                                          & ~KVM_MEM_LOG_DIRTY_PAGES)
            raise
        self._dirty = log

    def sync_dirty_log(self) -> None:
        """Move what KVM logged since the last sync into the log (and clear it
        in KVM, which write-protects those pages again)."""
        if self._dirty is None:
            raise RuntimeError("dirty logging is off")
        for fr, slot in list(self._by_start.values()):
            self._harvest(fr, slot)

    def stop_dirty_log(self) -> None:
        """Stop logging; what was logged since the last sync is synced first."""
        if self._dirty is None:
            return
        self.sync_dirty_log()
        for _, slot in self._by_start.values():
            self.vm.set_memslot_flags(slot, self.vm.memslots[slot].flags
                                      & ~KVM_MEM_LOG_DIRTY_PAGES)
        self._dirty = None

    @property
    def logging(self) -> bool:
        return self._dirty is not None

    def _harvest(self, fr: FlatRange, slot: int) -> None:
        assert self._dirty is not None
        m = self.vm.memslots[slot]
        bitmap = self.vm.get_dirty_log(slot)
        if not any(bitmap):
            return
        chunk = CLEAR_CHUNK // 8
        for first in range(0, len(bitmap), chunk):
            part = bitmap[first:first + chunk]
            if any(part):
                self.vm.clear_dirty_log(slot, first * 8, part)
        host = fr.region.host
        assert host is not None
        offset = m.userspace_addr - host.address
        self._dirty.merge(host, offset, m.memory_size // PAGE_SIZE, bitmap)

    def begin(self) -> None:
        self._freed.clear()

    def commit(self) -> None:
        self._freed.clear()

    def region_add(self, fr: FlatRange) -> None:
        region = fr.region
        if region.kind is not _RAM:
            return
        gpa, size = fr.start, fr.size
        if (gpa | size) % PAGE_SIZE:
            gpa, size, hva = _page_aligned(fr)
            if size <= 0:
                return                   # smaller than a page: left to MMIO emulation
        else:
            hva = region.host_address(fr.offset)
        flags = KVM_MEM_READONLY if fr.readonly else 0
        if self._dirty is not None:
            flags |= KVM_MEM_LOG_DIRTY_PAGES
        slot = self._freed.pop(fr, None) if self._freed else None
        if slot is not None and slot not in self.vm.memslots:
            self.vm.set_user_memory_region(slot, gpa, size, hva, flags, host_mapped=True)
        else:
            # host_mapped: hva comes from a HostMemory that is open (its
            # address property raises otherwise), no need for an msync.
            slot = self.vm.add_memslot(gpa, size, hva, flags, host_mapped=True)
        self._by_start[fr.start] = (fr, slot)

    def region_del(self, fr: FlatRange) -> None:
        entry = self._by_start.get(fr.start)
        if entry is None:
            return                       # an I/O or sub-page range: no slot
        mapped, slot = entry
        if mapped is not fr and mapped != fr:
            raise RuntimeError(f"KVM listener out of sync: asked to delete {fr}, "
                               f"but {mapped} is mapped there")
        if self._dirty is not None:      # what the guest wrote there must not be lost
            self._harvest(mapped, slot)
        self.vm.delete_memslot(slot)
        del self._by_start[fr.start]
        self._freed[fr] = slot

    # -- queries ------------------------------------------------------------

    def memslots(self) -> list[MemslotRecord]:
        """The memslots this listener holds, by guest address."""
        table = self.vm.memslots
        records = []
        for _, (fr, slot) in sorted(self._by_start.items()):
            m = table[slot]
            records.append(MemslotRecord(slot, m.guest_phys_addr, m.memory_size,
                                         m.userspace_addr, m.flags, fr.region.name,
                                         fr.alias.name if fr.alias is not None else None))
        return records

    def has_memory(self, space: AddressSpace, start: int, size: int) -> bool:
        """Whether a memslot maps exactly ``[start, start+size)`` of ``space``."""
        if space is not self.address_space:
            return False
        entry = self._by_start.get(start)
        return entry is not None and entry[0].size == size


def _page_aligned(fr: FlatRange) -> tuple[int, int, int]:
    """(guest address, size, host address) of the whole pages inside ``fr``."""
    start = -(-fr.start // PAGE_SIZE) * PAGE_SIZE
    end = (fr.start + fr.size) // PAGE_SIZE * PAGE_SIZE
    return start, end - start, fr.region.host_address(fr.offset + (start - fr.start))
