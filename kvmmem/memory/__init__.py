"""The guest memory model: host memory, a region tree in the style of QEMU's
memory API, flat views, transactions with listeners, the KVM memslot
listener, checked guest-physical access (the loader's and the devices')
and the ``info mtree`` renderer."""

from kvmmem.memory.address_space import AddressSpace, MemoryListener, UnassignedAccessError
from kvmmem.memory.flatview import FlatRange, FlatView
from kvmmem.memory.guest_memory import GuestMemory, GuestMemoryError
from kvmmem.memory.host import PAGE_SIZE, HostMemory, HostMemoryError, guard_regions_supported
from kvmmem.memory.kvm_listener import KvmMemoryListener, MemslotRecord
from kvmmem.memory.mtree import mtree_info
from kvmmem.memory.region import MemoryRegion, RegionKind
from kvmmem.memory.transaction import (
                                       MemoryRollbackError,
                                       address_spaces,
                                       begin,
                                       commit,
                                       memory_transaction,
                                       transaction_depth,
)

__all__ = [
    "AddressSpace", "FlatRange", "FlatView", "GuestMemory", "GuestMemoryError", "HostMemory", "HostMemoryError",
    "KvmMemoryListener", "MemoryListener", "MemoryRegion", "MemoryRollbackError",
    "MemslotRecord", "PAGE_SIZE", "RegionKind", "UnassignedAccessError", "address_spaces",
    "begin", "commit", "guard_regions_supported", "memory_transaction", "mtree_info",
    "transaction_depth",
]
