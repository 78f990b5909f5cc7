"""The bare ``KVM_SET_USER_MEMORY_REGION`` the benchmarks compare kvmmem with.

The argument is laid out by cffi from ``struct kvm_userspace_memory_region``
of <linux/kvm.h> (the same declaration the KVM layer uses), then handed to
``fcntl.ioctl`` as bytes: no binding code runs between Python and the kernel.
"""

from __future__ import annotations

from kvmmem.kvm import ffi, lib

__all__ = ["SET_USER_MEMORY_REGION", "memory_region"]

SET_USER_MEMORY_REGION: int = lib.KVM_SET_USER_MEMORY_REGION


def memory_region(slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                  flags: int = 0) -> bytes:
    """``struct kvm_userspace_memory_region`` as bytes (``memory_size`` 0 deletes the slot)."""
    region = ffi.new("struct kvm_userspace_memory_region *",
                     {"slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
                      "memory_size": memory_size, "userspace_addr": userspace_addr})
    return bytes(ffi.buffer(region))
