"""KVM capabilities by name, for ``check_extension`` and ``enable_cap``.

The values come from <linux/kvm.h> through the compiled extension (cdefs/),
as every other constant of the KVM layer; callers write ``Cap.NR_MEMSLOTS``
instead of reaching into ``lib``.
"""

from __future__ import annotations

import enum

from kvmmem.kvm._lib import lib

__all__ = ["Cap"]


class Cap(enum.IntEnum):
    """The ``KVM_CAP_*`` numbers kvmmem asks about (Documentation/virt/kvm/api.rst)."""

    NR_MEMSLOTS = lib.KVM_CAP_NR_MEMSLOTS
    CHECK_EXTENSION_VM = lib.KVM_CAP_CHECK_EXTENSION_VM
    USER_MEMORY = lib.KVM_CAP_USER_MEMORY
    USER_MEMORY2 = lib.KVM_CAP_USER_MEMORY2
    MEMORY_FAULT_INFO = lib.KVM_CAP_MEMORY_FAULT_INFO
    GUEST_MEMFD = lib.KVM_CAP_GUEST_MEMFD
    MANUAL_DIRTY_LOG_PROTECT2 = lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    IRQCHIP = lib.KVM_CAP_IRQCHIP
    IRQFD = lib.KVM_CAP_IRQFD
    IOEVENTFD = lib.KVM_CAP_IOEVENTFD
    PIT2 = lib.KVM_CAP_PIT2
    NR_VCPUS = lib.KVM_CAP_NR_VCPUS
    MAX_VCPUS = lib.KVM_CAP_MAX_VCPUS
    IMMEDIATE_EXIT = lib.KVM_CAP_IMMEDIATE_EXIT
    READONLY_MEM = lib.KVM_CAP_READONLY_MEM
    SET_IDENTITY_MAP_ADDR = lib.KVM_CAP_SET_IDENTITY_MAP_ADDR
    HALT_POLL = lib.KVM_CAP_HALT_POLL
