"""``Kvm``: the system file descriptor, ``/dev/kvm``."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from kvmmem.kvm._fd import FdObject
from kvmmem.kvm._lib import ffi, lib
from kvmmem.kvm.cpuid import Cpuid
from kvmmem.kvm.error import KvmError, KvmUnavailableError

if TYPE_CHECKING:
    from kvmmem.kvm.vm import Vm

DEFAULT_PATH = "/dev/kvm"
MAX_CPUID_ENTRIES = 256


class Kvm(FdObject):
    """An open ``/dev/kvm``: capability queries and VM creation.

    Opening fails with :class:`KvmUnavailableError`, one clear sentence, when
    the device is missing, not accessible or speaks an API other than 12.
    """

    def __init__(self, path: str = DEFAULT_PATH) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                errno.ENOENT, "open", f"{path} does not exist: this host has no KVM "
                "(load kvm_intel/kvm_amd, or enable nested virtualization)") from None
        except PermissionError:
            raise KvmUnavailableError(
                errno.EACCES, "open", f"no read-write access to {path}: run as root "
                "or add this user to the group that owns it (usually 'kvm')") from None
        super().__init__(fd)
        self.path = path
        version = self.get_api_version()
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmUnavailableError(
                errno.EINVAL, "KVM_GET_API_VERSION",
                f"{path} speaks KVM API {version}, kvmmem needs {lib.KVM_API_VERSION}")

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION: 12 on every kernel since 2.6.22."""
        return self._ioctl_int("KVM_GET_API_VERSION", lib.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the system fd: 0 if ``cap`` is absent."""
        return self._ioctl_int("KVM_CHECK_EXTENSION", lib.KVM_CHECK_EXTENSION, cap)

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to map of each vCPU fd (``kvm_run``)."""
        return self._ioctl_int("KVM_GET_VCPU_MMAP_SIZE", lib.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = MAX_CPUID_ENTRIES) -> Cpuid:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can give a guest."""
        cpuid = Cpuid.allocate(max_entries)
        self._ioctl_ptr("KVM_GET_SUPPORTED_CPUID", lib.KVM_GET_SUPPORTED_CPUID, cpuid.raw)
        return cpuid

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs whose state KVM saves and restores."""
        probe = ffi.new("struct kvm_msr_list *", {"indices": 0})
        try:
            self._ioctl_ptr("KVM_GET_MSR_INDEX_LIST", lib.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as exc:            # E2BIG, with the count filled in
            if exc.errno != errno.E2BIG:
                raise
        count = int(probe.nmsrs)
        full = ffi.new("struct kvm_msr_list *", {"indices": count})
        full.nmsrs = count
        self._ioctl_ptr("KVM_GET_MSR_INDEX_LIST", lib.KVM_GET_MSR_INDEX_LIST, full)
        return [int(full.indices[i]) for i in range(int(full.nmsrs))]

    def create_vm(self, machine_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new, empty VM."""
        from kvmmem.kvm.vm import Vm

        fd = self._ioctl_int("KVM_CREATE_VM", lib.KVM_CREATE_VM, machine_type)
        return Vm(fd, self)


def kvm_available(path: str = DEFAULT_PATH) -> str | None:
    """None if KVM can be used here, else the reason it cannot (for skips)."""
    try:
        with Kvm(path):
            return None
    except KvmError as exc:
        return str(exc.detail or exc)


__all__ = ["Kvm", "kvm_available", "DEFAULT_PATH", "ffi"]
