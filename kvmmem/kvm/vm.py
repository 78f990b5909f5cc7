"""``Vm``: a VM file descriptor, its ioctls and its memslot accounting."""

from __future__ import annotations

import errno
import heapq
import mmap
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kvmmem.kvm._fd import FdObject
from kvmmem.kvm._lib import ffi, lib
from kvmmem.kvm.caps import Cap
from kvmmem.kvm.error import KvmError

if TYPE_CHECKING:
    from kvmmem.kvm.system import Kvm
    from kvmmem.kvm.vcpu import Vcpu

PAGE_SIZE = mmap.PAGESIZE
FALLBACK_MEMSLOTS = 32
"""What a VMM assumes when KVM_CAP_NR_MEMSLOTS answers 0 (very old kernels)."""

_SET_REGION = "KVM_SET_USER_MEMORY_REGION"
_SET_REGION2 = "KVM_SET_USER_MEMORY_REGION2"


@dataclass(frozen=True, slots=True)
class Memslot:
    """One registered KVM memslot: guest range -> host range."""

    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    flags: int = 0

    @property
    def guest_end(self) -> int:
        """First guest-physical address after the slot."""
        return self.guest_phys_addr + self.memory_size


class Vm(FdObject):
    """A KVM VM: memslots, vCPUs, irqchip and eventfd wiring.

    Memslots are accounted here: the limit is KVM_CAP_NR_MEMSLOTS on this
    VM (32 if KVM answers 0), ids are handed out lowest-first from a free
    list, and a slot KVM refuses leaves the accounting as it was.
    """

    def __init__(self, fd: int, kvm: Kvm) -> None:
        super().__init__(fd)
        self.kvm = kvm
        self.max_memslots: int = self.check_extension(Cap.NR_MEMSLOTS) or FALLBACK_MEMSLOTS
        self.has_user_memory2 = bool(self.check_extension(Cap.USER_MEMORY2))
        self._slots: dict[int, Memslot] = {}
        self._freed: list[int] = []
        self._next_fresh = 0
        self._region = ffi.new("struct kvm_userspace_memory_region *")
        self._vcpus: list[Vcpu] = []

    # -- capabilities ------------------------------------------------------

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers may differ per VM)."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", lib.KVM_CHECK_EXTENSION, cap)


    # -- memslots ----------------------------------------------------------

    @property
    def memslots(self) -> Mapping[int, Memslot]:
        """Registered memslots by slot id (a read-only view)."""
        return MappingProxyType(self._slots)

    @property
    def used_memslots(self) -> int:
        return len(self._slots)

    @property
    def free_memslots(self) -> int:
        return self.max_memslots - len(self._slots)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0, *,
                               host_mapped: bool = False) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, change the flags of, or (with
        ``memory_size`` 0) delete the memslot ``slot``.

        KVM accepts a host range that is not mapped and faults later, so the
        range is checked first (one ``msync``), unless the caller vouches for
        it with ``host_mapped`` (the memory layer does: its RAM is a live
        ``HostMemory`` mapping).
        """
        self._check_region(_SET_REGION, slot, guest_phys_addr, memory_size, userspace_addr,
                           host_mapped)
        r = self._region
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = guest_phys_addr, memory_size, userspace_addr
        try:
            self._ioctl_ptr(_SET_REGION, lib.KVM_SET_USER_MEMORY_REGION, r)
        except KvmError as exc:
            raise self._explain(exc, slot, guest_phys_addr, memory_size) from None
        self._account(slot, guest_phys_addr, memory_size, userspace_addr, flags)

    def set_user_memory_region2(self, slot: int, guest_phys_addr: int, memory_size: int,
                                userspace_addr: int, flags: int = 0,
                                guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2): as
        :meth:`set_user_memory_region`, plus an optional guest_memfd."""
        if not self.has_user_memory2:
            raise KvmError(errno.ENOTTY, _SET_REGION2, "this kernel lacks KVM_CAP_USER_MEMORY2")
        self._check_region(_SET_REGION2, slot, guest_phys_addr, memory_size, userspace_addr)
        r = ffi.new("struct kvm_userspace_memory_region2 *")
        r.slot, r.flags = slot, flags
        r.guest_phys_addr, r.memory_size, r.userspace_addr = guest_phys_addr, memory_size, userspace_addr
        r.guest_memfd, r.guest_memfd_offset = guest_memfd, guest_memfd_offset
        try:
            self._ioctl_ptr(_SET_REGION2, lib.KVM_SET_USER_MEMORY_REGION2, r)
        except KvmError as exc:
            raise self._explain(exc, slot, guest_phys_addr, memory_size) from None
        self._account(slot, guest_phys_addr, memory_size, userspace_addr, flags)

    def add_memslot(self, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                    flags: int = 0, *, host_mapped: bool = False) -> int:
        """Register a memslot under the lowest free slot id and return the id
        (``host_mapped``: see :meth:`set_user_memory_region`)."""
        if memory_size <= 0:
            raise KvmError(errno.EINVAL, _SET_REGION, "a new memslot needs a size above 0")
        slot = self._lowest_free_slot()
        self.set_user_memory_region(slot, guest_phys_addr, memory_size, userspace_addr, flags,
                                    host_mapped=host_mapped)
        return slot

    def delete_memslot(self, slot: int) -> None:
        """Delete a registered memslot (KVM_SET_USER_MEMORY_REGION, size 0)."""
        if slot not in self._slots:
            raise KvmError(errno.ENOENT, _SET_REGION, f"memslot {slot} is not registered")
        self.set_user_memory_region(slot, 0, 0, 0)

    def set_memslot_flags(self, slot: int, flags: int) -> None:
        """Change only the flags of a registered memslot (KVM allows nothing
        else on a live slot): KVM_MEM_LOG_DIRTY_PAGES on or off."""
        m = self._slots.get(slot)
        if m is None:
            raise KvmError(errno.ENOENT, _SET_REGION, f"memslot {slot} is not registered")
        self.set_user_memory_region(slot, m.guest_phys_addr, m.memory_size, m.userspace_addr,
                                    flags, host_mapped=True)

    def enable_manual_dirty_log(self) -> None:
        """KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG no longer
        write-protects what it reports; :meth:`clear_dirty_log` does, for the
        pages the caller is about to copy (api.rst, 7.18)."""
        self.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                        lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear (and write-protect again) the pages of
        ``slot`` set in ``bitmap``, from ``first_page`` (a multiple of 64) for
        ``len(bitmap) * 8`` pages, cut at the slot's end."""
        m = self._slots.get(slot)
        if m is None:
            raise KvmError(errno.ENOENT, "KVM_CLEAR_DIRTY_LOG", f"memslot {slot} is not registered")
        pages = m.memory_size // PAGE_SIZE
        if first_page % 64 or not 0 <= first_page < pages:
            raise KvmError(errno.EINVAL, "KVM_CLEAR_DIRTY_LOG",
                           f"first page {first_page} is not a multiple of 64 inside {pages} pages")
        buf = ffi.new("char[]", bitmap)
        log = ffi.new("struct kvm_clear_dirty_log *")
        log.slot, log.first_page = slot, first_page
        log.num_pages = min(len(bitmap) * 8, pages - first_page)
        log.dirty_bitmap = buf
        self._ioctl_ptr("KVM_CLEAR_DIRTY_LOG", lib.KVM_CLEAR_DIRTY_LOG, log)

    def get_dirty_log(self, slot: int) -> bytes:
        """KVM_GET_DIRTY_LOG: one bit per page of ``slot`` (needs the slot's
        KVM_MEM_LOG_DIRTY_PAGES flag); the log is reset by the call."""
        memslot = self._slots.get(slot)
        if memslot is None:
            raise KvmError(errno.ENOENT, "KVM_GET_DIRTY_LOG", f"memslot {slot} is not registered")
        pages = memslot.memory_size // PAGE_SIZE
        bitmap = ffi.new("char[]", ((pages + 63) // 64) * 8)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot, log.dirty_bitmap = slot, bitmap
        self._ioctl_ptr("KVM_GET_DIRTY_LOG", lib.KVM_GET_DIRTY_LOG, log)
        return bytes(ffi.buffer(bitmap))

    def _check_region(self, name: str, slot: int, gpa: int, size: int, uaddr: int,
                      host_mapped: bool = False) -> None:
        """Refuse, before the ioctl, what KVM would refuse or silently accept
        wrongly, with a message that says which rule was broken."""
        if not 0 <= slot < self.max_memslots:
            raise KvmError(errno.EINVAL, name, f"slot {slot} is outside 0..{self.max_memslots - 1} "
                           f"(KVM_CAP_NR_MEMSLOTS is {self.max_memslots})")
        if size < 0 or gpa < 0 or uaddr < 0:
            raise KvmError(errno.EINVAL, name, "address and size must not be negative")
        if size == 0:
            if slot not in self._slots:
                raise KvmError(errno.ENOENT, name, f"memslot {slot} is not registered")
            return
        if (gpa | size | uaddr) % PAGE_SIZE:
            for what, value in (("guest_phys_addr", gpa), ("memory_size", size),
                                ("userspace_addr", uaddr)):
                if value % PAGE_SIZE:
                    raise KvmError(errno.EINVAL, name, f"{what} {value:#x} is not a multiple of "
                                   f"the {PAGE_SIZE}-byte page size")
        if not host_mapped and lib.kvmmem_range_mapped(uaddr, size) != 0:
            raise KvmError(errno.EFAULT, name, f"host range {uaddr:#x}+{size:#x} is not "
                           "(entirely) mapped in this process")

    def _explain(self, exc: KvmError, slot: int, gpa: int, size: int) -> KvmError:
        if exc.errno == errno.EEXIST:
            for other in self._slots.values():
                if other.slot != slot and gpa < other.guest_end and other.guest_phys_addr < gpa + size:
                    return KvmError(exc.errno, exc.ioctl,
                                    f"guest range {gpa:#x}+{size:#x} overlaps memslot {other.slot} "
                                    f"({other.guest_phys_addr:#x}+{other.memory_size:#x})")
        if exc.errno == errno.EINVAL and slot in self._slots and size:
            return KvmError(exc.errno, exc.ioctl, f"memslot {slot} exists: only its flags can "
                            "change; delete it first to move or resize it")
        return exc

    def _account(self, slot: int, gpa: int, size: int, uaddr: int, flags: int) -> None:
        if size == 0:
            del self._slots[slot]
            heapq.heappush(self._freed, slot)
        else:
            self._slots[slot] = Memslot(slot, gpa, size, uaddr, flags)

    def _lowest_free_slot(self) -> int:
        freed = self._freed
        while freed and freed[0] in self._slots:
            heapq.heappop(freed)
        while self._next_fresh in self._slots:
            self._next_fresh += 1
        candidate = min(freed[0], self._next_fresh) if freed else self._next_fresh
        if candidate >= self.max_memslots:
            raise KvmError(errno.ENOSPC, _SET_REGION,
                           f"all {self.max_memslots} memslots of this VM are in use")
        if freed and candidate == freed[0]:
            heapq.heappop(freed)
        return candidate

    # -- the x86 platform ----------------------------------------------------

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space for Intel's
        real-mode emulation (must not overlap RAM or MMIO)."""
        self._ioctl_int("KVM_SET_TSS_ADDR", lib.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map."""
        value = ffi.new("__u64 *", addr)
        self._ioctl_ptr("KVM_SET_IDENTITY_MAP_ADDR", lib.KVM_SET_IDENTITY_MAP_ADDR, value)

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and LAPICs (before vCPUs)."""
        self._ioctl_int("KVM_CREATE_IRQCHIP", lib.KVM_CREATE_IRQCHIP)

    def get_irqchip(self, chip_id: int) -> Any:
        """KVM_GET_IRQCHIP: the state of one in-kernel PIC or the IOAPIC."""
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        self._ioctl_ptr("KVM_GET_IRQCHIP", lib.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: Any) -> None:
        """KVM_SET_IRQCHIP: restore a state from :meth:`get_irqchip`."""
        self._ioctl_ptr("KVM_SET_IRQCHIP", lib.KVM_SET_IRQCHIP, chip)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: the in-kernel i8254 timer."""
        config = ffi.new("struct kvm_pit_config *")
        config.flags = flags
        self._ioctl_ptr("KVM_CREATE_PIT2", lib.KVM_CREATE_PIT2, config)

    def get_pit2(self) -> Any:
        """KVM_GET_PIT2: the state of the in-kernel PIT's three channels."""
        state = ffi.new("struct kvm_pit_state2 *")
        self._ioctl_ptr("KVM_GET_PIT2", lib.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: Any) -> None:
        """KVM_SET_PIT2: restore a state from :meth:`get_pit2`."""
        self._ioctl_ptr("KVM_SET_PIT2", lib.KVM_SET_PIT2, state)

    def get_clock(self) -> Any:
        """KVM_GET_CLOCK: the guest's kvmclock time base."""
        state = ffi.new("struct kvm_clock_data *")
        self._ioctl_ptr("KVM_GET_CLOCK", lib.KVM_GET_CLOCK, state)
        return state

    def set_clock(self, state: Any) -> None:
        """KVM_SET_CLOCK (only ``clock`` counts; the flags KVM reported are cleared)."""
        state.flags = 0
        self._ioctl_ptr("KVM_SET_CLOCK", lib.KVM_SET_CLOCK, state)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        """KVM_IRQFD: a write to eventfd ``fd`` raises ``gsi``."""
        req = ffi.new("struct kvm_irqfd *")
        req.fd, req.gsi = fd, gsi
        req.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        self._ioctl_ptr("KVM_IRQFD", lib.KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals eventfd ``fd``
        without an exit to the VMM."""
        req = ffi.new("struct kvm_ioeventfd *")
        req.addr, req.len, req.fd = addr, length, fd
        flags = 0
        if datamatch is not None:
            req.datamatch = datamatch
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req.flags = flags
        self._ioctl_ptr("KVM_IOEVENTFD", lib.KVM_IOEVENTFD, req)

    # -- vCPUs ---------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU, with its ``kvm_run`` page mapped."""
        from kvmmem.kvm.vcpu import Vcpu

        fd = self._ioctl_int("KVM_CREATE_VCPU", lib.KVM_CREATE_VCPU, vcpu_id)
        vcpu = Vcpu(fd, vcpu_id, self.kvm.get_vcpu_mmap_size())
        self._vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close the vCPUs, then the VM (KVM frees its memslots)."""
        for vcpu in self._vcpus:
            vcpu.close()
        self._vcpus.clear()
        if not self.closed:
            self._slots.clear()
            self._freed.clear()
            self._next_fresh = 0
        super().close()
