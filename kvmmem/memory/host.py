"""Host memory: one host mapping that guest RAM regions are carved from.

A :class:`HostMemory` owns a single mapping (anonymous private by default,
or a shared memfd mapping for later sharing with other processes) and the
madvise-level operations a memory device performs on block ranges of it:
discard, populate, protect/unprotect and transparent huge pages.  All range
arguments are byte offsets into the mapping and must be page aligned.
"""

from __future__ import annotations

import bisect
import ctypes
import errno as _errno
import fcntl
import itertools
import mmap
import os

__all__ = ["HostMemory", "HostMemoryError", "PAGE_SIZE", "guard_regions_supported"]

PAGE_SIZE: int = mmap.PAGESIZE

# Linux UAPI numbers the mmap module of Python 3.11 does not export.
MAP_NORESERVE = 0x4000            # asm-generic/mman-common.h (x86 too)
MADV_POPULATE_WRITE = 23          # Linux 5.14
MADV_GUARD_INSTALL = 102          # Linux 6.13
MADV_GUARD_REMOVE = 103           # Linux 6.13
PROT_NONE = 0                     # <sys/mman.h>; Python's mmap module has it from 3.13 only
MFD_CLOEXEC = 0x0001

_libc = ctypes.CDLL(None, use_errno=True)
_mprotect = _libc.mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mprotect.restype = ctypes.c_int

_ids = itertools.count()
_guard_supported: bool | None = None


class HostMemoryError(OSError):
    """A syscall on host memory failed; the message names call, range and errno."""


def guard_regions_supported() -> bool:
    """Whether this kernel has MADV_GUARD_INSTALL (probed once on a scratch page)."""
    global _guard_supported
    if _guard_supported is None:
        probe = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE)
        try:
            probe.madvise(MADV_GUARD_INSTALL, 0, PAGE_SIZE)
            _guard_supported = True
        except OSError:
            _guard_supported = False
        finally:
            probe.close()
    return _guard_supported


class HostMemory:
    """One host virtual memory mapping, the backing store of RAM regions.

    ``size`` bytes are reserved with ``MAP_NORESERVE``, so a mapping far
    larger than the host's RAM costs nothing until pages are touched.
    With ``shared=True`` the mapping is ``MAP_SHARED`` of a memfd (see
    :attr:`fd`), so the same pages can later be mapped by another process.
    """

    __slots__ = ("name", "id", "size", "shared", "sealed", "_map", "_fd", "_address",
                 "_guard_mode", "_prot_starts", "_prot_ends", "__weakref__")

    def __init__(self, size: int, name: str = "", *, shared: bool = False,
                 hugepage: bool = False, seal: bool = False) -> None:
        if not isinstance(size, int) or isinstance(size, bool):
            raise TypeError(f"HostMemory size must be an int, not {type(size).__name__}")
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"HostMemory size {size:#x} must be a positive multiple "
                             f"of the page size {PAGE_SIZE:#x}")
        self.id: int = next(_ids)
        self.name: str = name or f"hostmem{self.id}"
        self.size: int = size
        self.shared: bool = shared
        self.sealed: bool = seal and shared
        """The memfd's size is sealed (QEMU's memory-backend-memfd ``seal=on``:
        F_SEAL_GROW, F_SEAL_SHRINK, F_SEAL_SEAL, ``memfd_create(2)``)."""
        self._fd: int = -1
        self._guard_mode: bool | None = None   # decided at the first protect()
        # Protected ranges, disjoint and sorted: parallel start/end lists.
        self._prot_starts: list[int] = []
        self._prot_ends: list[int] = []
        try:
            if shared:
                flags = MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if self.sealed else 0)
                self._fd = os.memfd_create(self.name, flags)
                os.ftruncate(self._fd, size)
                if self.sealed:
                    fcntl.fcntl(self._fd, fcntl.F_ADD_SEALS,
                                fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
                self._map = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED | MAP_NORESERVE)
            else:
                self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
        except OSError as exc:
            if self._fd >= 0:
                os.close(self._fd)
            kind = "memfd MAP_SHARED" if shared else "MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE"
            raise HostMemoryError(exc.errno, f"mmap({kind}) of {size:#x} bytes for "
                                  f"{self.name!r} failed: {_errstr(exc.errno)}") from exc
        # The buffer export is released as soon as the temporary dies.
        self._address: int = ctypes.addressof((ctypes.c_char * 1).from_buffer(self._map))
        if hugepage:
            self.set_hugepage(0, size)

    # -- properties ----------------------------------------------------------

    @property
    def address(self) -> int:
        """Host virtual address of offset 0 (KVM's ``userspace_addr`` base)."""
        self._check_open()
        return self._address

    @property
    def fd(self) -> int:
        """The memfd of a shared mapping, -1 for an anonymous one."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._map.closed

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"@{self._address:#x}"
        return f"HostMemory({self.name!r}, size={self.size:#x}, {state})"

    # -- madvise-level operations -------------------------------------------

    def discard(self, offset: int, size: int) -> None:
        """Drop the pages of a range: the memory returns to the host, reads give zeros.

        ``MADV_DONTNEED`` for a private mapping; ``MADV_REMOVE`` for a memfd,
        where DONTNEED would only unmap and leave the pages in the file.
        """
        self._check_range(offset, size)
        advice = mmap.MADV_REMOVE if self.shared else mmap.MADV_DONTNEED
        self._madvise(advice, offset, size)

    def populate(self, offset: int, size: int) -> None:
        """Allocate (write-fault) every page of a range now, not on first guest access."""
        self._check_range(offset, size)
        try:
            self._map.madvise(MADV_POPULATE_WRITE, offset, size)
            return
        except OSError as exc:
            if exc.errno != _errno.EINVAL:
                raise self._error("madvise(MADV_POPULATE_WRITE)", offset, size, exc) from exc
        if self._overlaps_protected(offset, size):
            raise HostMemoryError(_errno.EFAULT, f"populate of protected range "
                                  f"{_fmt(offset, size)} of {self.name!r}")
        m = self._map
        for page in range(offset, offset + size, PAGE_SIZE):   # pre-5.14 kernels
            m[page] = m[page]

    def set_hugepage(self, offset: int, size: int, enable: bool = True) -> None:
        """Ask for transparent huge pages on a range (``MADV_HUGEPAGE``/``NOHUGEPAGE``)."""
        self._check_range(offset, size)
        self._madvise(mmap.MADV_HUGEPAGE if enable else mmap.MADV_NOHUGEPAGE, offset, size)

    def protect(self, offset: int, size: int) -> None:
        """Make a range inaccessible; any access faults (a guest sees an MMIO exit).

        Uses guard regions (``MADV_GUARD_INSTALL``) where the kernel has them:
        installing a guard zaps the pages, so only protect memory whose
        content may be lost (unplugged blocks).  Falls back to
        ``mprotect(PROT_NONE)``, which keeps the content.
        """
        self._check_range(offset, size)
        if self._guard_mode is None:
            self._guard_mode = guard_regions_supported()
        if self._guard_mode:
            try:
                self._map.madvise(MADV_GUARD_INSTALL, offset, size)
            except OSError as exc:
                if exc.errno != _errno.EINVAL or self._prot_starts:
                    raise self._error("madvise(MADV_GUARD_INSTALL)", offset, size, exc) from exc
                self._guard_mode = False    # e.g. a kernel without guards on shmem
        if not self._guard_mode:
            self._mprotect(offset, size, PROT_NONE)
        self._mark_protected(offset, size, True)

    def unprotect(self, offset: int, size: int) -> None:
        """Make a protected range accessible again (guard pages read back as zeros)."""
        self._check_range(offset, size)
        if self._guard_mode:
            self._madvise(MADV_GUARD_REMOVE, offset, size)
        else:
            self._mprotect(offset, size, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mark_protected(offset, size, False)

    def is_protected(self, offset: int, size: int = PAGE_SIZE) -> bool:
        """Whether the whole range is currently protected (from this object's records)."""
        self._check_range(offset, size)
        i = bisect.bisect_right(self._prot_starts, offset) - 1
        return i >= 0 and self._prot_ends[i] >= offset + size

    def protected_ranges(self) -> list[tuple[int, int]]:
        """The protected ranges as sorted, disjoint ``(offset, size)`` pairs."""
        return [(s, e - s) for s, e in zip(self._prot_starts, self._prot_ends)]

    # -- byte access, for tests and device emulation -------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Copy ``size`` bytes at ``offset`` (refuses protected memory instead of faulting)."""
        self._check_bytes(offset, size)
        return self._map[offset:offset + size]

    def maybe_data(self, offset: int, size: int) -> list[bool]:
        """Per page of ``[offset, offset + size)``: False where the page is surely
        zero without reading it, True where it may hold data. A private mapping's
        page that was never touched is neither present nor swapped out
        (``/proc/self/pagemap``, bits 63 and 62: kernel's
        ``Documentation/admin-guide/mm/pagemap.rst``), so it still reads as zero;
        reading it would map the zero page and cost page tables. A shared
        (memfd) page may be written through another mapping: always True."""
        self._check_bytes(offset, size)
        pages = -(-size // PAGE_SIZE)
        if self.shared:
            return [True] * pages
        try:
            with open("/proc/self/pagemap", "rb") as f:
                f.seek((self.address + offset) // PAGE_SIZE * 8)
                raw = f.read(pages * 8)
        except OSError:
            return [True] * pages
        if len(raw) != pages * 8:
            return [True] * pages
        return [bool(int.from_bytes(raw[i:i + 8], "little") >> 62) for i in range(0, len(raw), 8)]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` (refuses protected memory instead of faulting)."""
        self._check_bytes(offset, len(data))
        self._map[offset:offset + len(data)] = data

    # -- lifetime -------------------------------------------------------------

    def close(self) -> None:
        """Unmap the memory (and close the memfd); further use raises ValueError."""
        if not self._map.closed:
            self._map.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> HostMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._map.closed:
            raise ValueError(f"HostMemory {self.name!r} is closed")

    def _check_range(self, offset: int, size: int) -> None:
        if self._map.closed:
            raise ValueError(f"HostMemory {self.name!r} is closed")
        if (offset | size) % PAGE_SIZE or size <= 0 or offset < 0 or offset + size > self.size:
            raise ValueError(f"range {_fmt(offset, size)} is not a non-empty, page aligned "
                             f"range inside {self.name!r} (size {self.size:#x})")

    def _check_bytes(self, offset: int, size: int) -> None:
        self._check_open()
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"byte range {_fmt(offset, size)} lies outside {self.name!r} "
                             f"(size {self.size:#x})")
        if size and self._overlaps_protected(offset, size):
            raise HostMemoryError(_errno.EFAULT, f"access to protected memory "
                                  f"{_fmt(offset, size)} of {self.name!r}")

    def _madvise(self, advice: int, offset: int, size: int) -> None:
        try:
            self._map.madvise(advice, offset, size)
        except OSError as exc:
            raise self._error(f"madvise({_ADVICE_NAMES.get(advice, advice)})",
                              offset, size, exc) from exc

    def _mprotect(self, offset: int, size: int, prot: int) -> None:
        if _mprotect(self._address + offset, size, prot) != 0:
            err = ctypes.get_errno()
            raise HostMemoryError(err, f"mprotect({prot:#x}) of {_fmt(offset, size)} of "
                                  f"{self.name!r} failed: {_errstr(err)}")

    def _error(self, call: str, offset: int, size: int, exc: OSError) -> HostMemoryError:
        return HostMemoryError(exc.errno, f"{call} of {_fmt(offset, size)} of {self.name!r} "
                               f"failed: {_errstr(exc.errno)}")

    def _overlaps_protected(self, offset: int, size: int) -> bool:
        i = bisect.bisect_left(self._prot_ends, offset + 1)
        return i < len(self._prot_starts) and self._prot_starts[i] < offset + size

    def _mark_protected(self, offset: int, size: int, protected: bool) -> None:
        """Add or cut ``[offset, offset+size)`` in the sorted disjoint interval lists."""
        starts, ends = self._prot_starts, self._prot_ends
        end = offset + size
        # Intervals touching [offset, end] (adjacent ones merge when adding).
        lo = bisect.bisect_left(ends, offset)
        hi = bisect.bisect_right(starts, end)
        keep: list[tuple[int, int]] = []
        if protected:
            if lo < hi:
                offset = min(offset, starts[lo])
                end = max(end, ends[hi - 1])
            keep.append((offset, end))
        else:
            for s, e in zip(starts[lo:hi], ends[lo:hi]):
                if s < offset:
                    keep.append((s, offset))
                if e > end:
                    keep.append((end, e))
        starts[lo:hi] = [s for s, _ in keep]
        ends[lo:hi] = [e for _, e in keep]


_ADVICE_NAMES = {
    mmap.MADV_DONTNEED: "MADV_DONTNEED",
    mmap.MADV_REMOVE: "MADV_REMOVE",
    mmap.MADV_HUGEPAGE: "MADV_HUGEPAGE",
    mmap.MADV_NOHUGEPAGE: "MADV_NOHUGEPAGE",
    MADV_POPULATE_WRITE: "MADV_POPULATE_WRITE",
    MADV_GUARD_INSTALL: "MADV_GUARD_INSTALL",
    MADV_GUARD_REMOVE: "MADV_GUARD_REMOVE",
}


def _fmt(offset: int, size: int) -> str:
    return f"[{offset:#x}, +{size:#x})"


def _errstr(err: int | None) -> str:
    if err is None:
        return "unknown error"
    return f"errno {err} ({_errno.errorcode.get(err, '?')}: {os.strerror(err)})"
