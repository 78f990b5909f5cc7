"""The system fd: API version, capabilities, VM creation, clear errors."""

from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from kvmmem.kvm import Cap, Kvm, KvmError, KvmUnavailableError, lib

pytestmark = pytest.mark.kvm


def test_api_version_is_12(kvm: Kvm) -> None:
    assert kvm.get_api_version() == 12 == lib.KVM_API_VERSION


def test_check_extension_reports_memslot_limit_on_vm(kvm: Kvm) -> None:
    assert kvm.check_extension(Cap.CHECK_EXTENSION_VM) > 0
    vm = kvm.create_vm()
    try:
        limit = vm.check_extension(Cap.NR_MEMSLOTS)
        assert limit > 0
        assert vm.max_memslots == limit
        assert vm.used_memslots == 0 and vm.free_memslots == limit
    finally:
        vm.close()


def test_system_capabilities_needed_by_kvmmem(kvm: Kvm) -> None:
    for cap in (Cap.USER_MEMORY, Cap.IRQCHIP, Cap.IRQFD,
                Cap.IOEVENTFD, Cap.PIT2):
        assert kvm.check_extension(cap) > 0, cap
    assert kvm.check_extension(0x7FFFFFF0) == 0  # a capability no kernel has


def test_supported_cpuid_has_basic_leaves(kvm: Kvm) -> None:
    cpuid = kvm.get_supported_cpuid()
    functions = {e.function for e in cpuid}
    assert 0 in functions and 1 in functions and 0x80000001 in functions
    assert cpuid.find(0) is not None


def test_missing_device_gives_one_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(KvmUnavailableError) as info:
        Kvm(str(tmp_path / "kvm"))
    assert info.value.errno == errno.ENOENT
    assert "does not exist" in str(info.value)


def test_ioctl_on_closed_fd_names_ioctl_and_errno(kvm: Kvm) -> None:
    other = Kvm()
    other.close()
    with pytest.raises(KvmError) as info:
        other.check_extension(Cap.NR_MEMSLOTS)
    assert info.value.errno == errno.EBADF
    assert info.value.ioctl == "KVM_CHECK_EXTENSION"
    assert "KVM_CHECK_EXTENSION" in str(info.value) and "EBADF" in str(info.value)


def test_max_memslots_one_liner_from_the_readme() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "from kvmmem.kvm import Kvm; print(Kvm().create_vm().max_memslots)"],
        capture_output=True, text=True, check=True)
    with Kvm() as kvm, kvm.create_vm() as vm:
        assert int(out.stdout) == vm.check_extension(Cap.NR_MEMSLOTS)


def test_enable_cap_on_vm_and_refusal_names_the_ioctl(kvm: Kvm) -> None:
    with kvm.create_vm() as vm:
        assert vm.check_extension(Cap.HALT_POLL)
        vm.enable_cap(Cap.HALT_POLL, 1000)
        assert vm.ioctl_counts["KVM_ENABLE_CAP"] == 1
        with pytest.raises(KvmError) as info:       # reported, but not something to enable
            vm.enable_cap(Cap.NR_MEMSLOTS)
        assert info.value.ioctl == "KVM_ENABLE_CAP" and info.value.errno == errno.EINVAL


def test_capabilities_have_names_with_the_kernel_numbers() -> None:
    assert all(cap == getattr(lib, f"KVM_CAP_{cap.name}") for cap in Cap)
    assert (Cap.NR_MEMSLOTS.value, Cap.USER_MEMORY2.value) == (10, 231)   # linux/kvm.h
