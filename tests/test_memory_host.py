"""HostMemory: reservation, discard, populate, protect, errors (kvmmem.memory.host)."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator

import pytest

from kvmmem.memory import host as host_module
from kvmmem.memory.host import PAGE_SIZE, HostMemory, HostMemoryError, guard_regions_supported

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(mem: HostMemory, offset: int, size: int) -> list[bool]:
    """Which pages of the range are in RAM, from mincore(2)."""
    pages = size // PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    assert _libc.mincore(mem.address + offset, size, vec) == 0, os.strerror(ctypes.get_errno())
    return [bool(b & 1) for b in vec]


def kernel_can_read(mem: HostMemory, offset: int) -> bool:
    """Read one byte through /proc/self/mem: fails (EIO) on guard pages instead of faulting."""
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        os.pread(fd, 1, mem.address + offset)
        return True
    except OSError as exc:
        assert exc.errno in (errno.EIO, errno.EFAULT)
        return False
    finally:
        os.close(fd)


@pytest.fixture
def mem() -> Iterator[HostMemory]:
    with HostMemory(64 * MiB, "test-mem") as m:
        yield m


def test_64_tib_can_be_reserved_on_a_small_machine() -> None:
    with HostMemory(64 * TiB, "huge") as big:
        assert big.size == 64 * TiB
        assert big.address % PAGE_SIZE == 0
        big.write(63 * TiB, b"far")
        assert big.read(63 * TiB, 3) == b"far"
        big.discard(63 * TiB, PAGE_SIZE)
        assert big.read(63 * TiB, 3) == b"\0\0\0"


def test_read_write_round_trip_and_ids(mem: HostMemory) -> None:
    other = HostMemory(PAGE_SIZE)
    try:
        assert other.id != mem.id
        assert other.name and other.name != mem.name
        mem.write(12345, b"payload")
        assert mem.read(12345, 7) == b"payload"
        assert mem.read(0, 4) == b"\0\0\0\0"
    finally:
        other.close()


def test_discard_returns_memory_and_zeroes(mem: HostMemory) -> None:
    mem.write(0, b"\xff" * (4 * PAGE_SIZE))
    assert resident_pages(mem, 0, 4 * PAGE_SIZE) == [True] * 4
    mem.discard(PAGE_SIZE, 2 * PAGE_SIZE)
    assert resident_pages(mem, 0, 4 * PAGE_SIZE) == [True, False, False, True]
    assert mem.read(PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert mem.read(0, 1) == b"\xff"


def test_populate_makes_pages_resident(mem: HostMemory) -> None:
    assert not any(resident_pages(mem, 0, 8 * PAGE_SIZE))
    mem.populate(2 * PAGE_SIZE, 4 * PAGE_SIZE)
    assert resident_pages(mem, 0, 8 * PAGE_SIZE) == [False, False] + [True] * 4 + [False, False]


def test_populate_keeps_content(mem: HostMemory) -> None:
    mem.write(PAGE_SIZE + 7, b"kept")
    mem.populate(0, 4 * PAGE_SIZE)
    assert mem.read(PAGE_SIZE + 7, 4) == b"kept"


def test_shared_memfd_mapping_discards_for_real() -> None:
    with HostMemory(16 * MiB, "shared", shared=True) as shm:
        assert shm.fd >= 0
        shm.write(0, b"abc")
        assert os.pread(shm.fd, 3, 0) == b"abc"         # the memfd sees the same pages
        shm.discard(0, PAGE_SIZE)
        assert os.pread(shm.fd, 3, 0) == b"\0\0\0"       # gone from the file too
    assert shm.fd == -1


def test_protect_blocks_access_and_unprotect_restores_it(mem: HostMemory) -> None:
    mem.write(4 * PAGE_SIZE, b"x")
    mem.protect(4 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert mem.is_protected(4 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert not mem.is_protected(3 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert not kernel_can_read(mem, 4 * PAGE_SIZE)
    assert kernel_can_read(mem, 6 * PAGE_SIZE)
    with pytest.raises(HostMemoryError) as info:
        mem.read(5 * PAGE_SIZE, 1)
    assert info.value.errno == errno.EFAULT
    mem.unprotect(4 * PAGE_SIZE, 2 * PAGE_SIZE)
    assert not mem.is_protected(4 * PAGE_SIZE)
    assert kernel_can_read(mem, 4 * PAGE_SIZE)
    if guard_regions_supported():
        assert mem.read(4 * PAGE_SIZE, 1) == b"\0"      # guard install zaps the page


def test_protect_without_guard_regions_uses_mprotect_and_keeps_the_content(
        mem: HostMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the path of kernels before 6.13: this kernel's guard regions are not asked for
    monkeypatch.setattr(host_module, "guard_regions_supported", lambda: False)
    mem.write(4 * PAGE_SIZE, b"x")
    mem.protect(4 * PAGE_SIZE, PAGE_SIZE)
    assert vma_permissions(mem.address + 4 * PAGE_SIZE) == "---p"
    assert mem.is_protected(4 * PAGE_SIZE)
    mem.unprotect(4 * PAGE_SIZE, PAGE_SIZE)
    assert vma_permissions(mem.address + 4 * PAGE_SIZE) == "rw-p"
    assert mem.read(4 * PAGE_SIZE, 1) == b"x"           # mprotect keeps the page


def vma_permissions(address: int) -> str:
    """The permissions /proc/self/maps gives the mapping holding ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return perms
    raise LookupError(hex(address))


def test_this_kernel_has_guard_regions() -> None:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert guard_regions_supported() == ((major, minor) >= (6, 13))


def test_protected_ranges_merge_and_split(mem: HostMemory) -> None:
    p = PAGE_SIZE
    mem.protect(0, 2 * p)
    mem.protect(2 * p, 2 * p)
    mem.protect(8 * p, p)
    assert mem.protected_ranges() == [(0, 4 * p), (8 * p, p)]
    mem.unprotect(p, 2 * p)
    assert mem.protected_ranges() == [(0, p), (3 * p, p), (8 * p, p)]
    mem.unprotect(0, 9 * p)
    assert mem.protected_ranges() == []


def test_populate_of_protected_memory_names_call_range_and_errno(mem: HostMemory) -> None:
    mem.protect(0, PAGE_SIZE)
    with pytest.raises(HostMemoryError) as info:
        mem.populate(0, PAGE_SIZE)
    assert info.value.errno == errno.EFAULT
    text = str(info.value)
    assert "MADV_POPULATE_WRITE" in text and "[0x0, +0x1000)" in text and "EFAULT" in text


def test_hugepage_advice_is_accepted(mem: HostMemory) -> None:
    mem.set_hugepage(0, 4 * MiB)
    mem.set_hugepage(0, 4 * MiB, enable=False)
    with HostMemory(4 * MiB, hugepage=True) as huge:
        huge.write(0, b"t")
        assert huge.read(0, 1) == b"t"


@pytest.mark.parametrize("offset,size", [(1, PAGE_SIZE), (0, 1), (0, 0), (-PAGE_SIZE, PAGE_SIZE),
                                         (64 * MiB - PAGE_SIZE, 2 * PAGE_SIZE)])
def test_bad_ranges_are_refused_and_change_nothing(mem: HostMemory, offset: int, size: int) -> None:
    mem.write(0, b"z")
    for call in (mem.discard, mem.populate, mem.protect, mem.unprotect):
        with pytest.raises(ValueError, match="page aligned"):
            call(offset, size)
    assert mem.read(0, 1) == b"z"
    assert mem.protected_ranges() == []


@pytest.mark.parametrize("size", [0, PAGE_SIZE + 1, -PAGE_SIZE])
def test_bad_sizes_are_refused(size: int) -> None:
    with pytest.raises(ValueError):
        HostMemory(size)


def test_non_int_size_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        HostMemory(4096.0)  # type: ignore[arg-type]


def test_byte_access_outside_is_refused(mem: HostMemory) -> None:
    with pytest.raises(ValueError):
        mem.read(64 * MiB - 1, 2)
    with pytest.raises(ValueError):
        mem.write(-1, b"a")


def test_close_unmaps_and_later_use_is_refused() -> None:
    m = HostMemory(PAGE_SIZE, "short-lived")
    address = m.address
    m.close()
    assert m.closed
    m.close()                                              # idempotent
    with pytest.raises(ValueError, match="closed"):
        m.discard(0, PAGE_SIZE)
    with pytest.raises(ValueError, match="closed"):
        _ = m.address
    fd = os.open("/proc/self/mem", os.O_RDONLY)
    try:
        with pytest.raises(OSError):
            os.pread(fd, 1, address)                          # really unmapped
    finally:
        os.close(fd)
