"""Memslot accounting on ``Vm`` against the real KVM: ids, limits, refusals."""

from __future__ import annotations

import errno

import pytest

from kvmmem.kvm import PAGE_SIZE, KvmError, Vm, lib

pytestmark = pytest.mark.kvm

MIB = 1 << 20
GIB = 1 << 30


def snapshot(vm: Vm) -> tuple[dict, int, int]:
    return dict(vm.memslots), vm.used_memslots, vm.free_memslots


def test_add_and_delete_hand_out_lowest_free_ids(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(8 * MIB)
    ids = [vm.add_memslot(i * 2 * MIB, 2 * MIB, buf.address + i * 2 * MIB) for i in range(4)]
    assert ids == [0, 1, 2, 3]
    assert vm.used_memslots == 4 and vm.free_memslots == vm.max_memslots - 4
    vm.delete_memslot(1)
    vm.delete_memslot(2)
    assert sorted(vm.memslots) == [0, 3]
    assert vm.add_memslot(2 * MIB, 2 * MIB, buf.address + 2 * MIB) == 1
    assert vm.add_memslot(4 * MIB, 2 * MIB, buf.address + 4 * MIB) == 2
    assert vm.memslots[2].guest_phys_addr == 4 * MIB
    assert vm.memslots[2].userspace_addr == buf.address + 4 * MIB


def test_deleted_slot_no_longer_maps_guest_memory(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(2 * MIB)
    slot = vm.add_memslot(0, 2 * MIB, buf.address)
    vm.delete_memslot(slot)
    # the same guest range can be registered again only because KVM deleted it
    assert vm.add_memslot(0, 2 * MIB, buf.address) == slot
    assert vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"] == 3


def test_overlapping_slot_is_refused_and_accounting_unchanged(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(4 * MIB)
    vm.add_memslot(0, 4 * MIB, buf.address)
    before = snapshot(vm)
    with pytest.raises(KvmError) as info:
        vm.add_memslot(2 * MIB, 2 * MIB, buf.address)
    assert info.value.errno == errno.EEXIST
    assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert "overlaps memslot 0" in str(info.value)
    assert snapshot(vm) == before
    # and the refused id is still free for the next caller
    assert vm.add_memslot(4 * MIB, 2 * MIB, buf.address) == 1


@pytest.mark.parametrize("field", ["guest_phys_addr", "memory_size", "userspace_addr"])
def test_misaligned_slot_is_refused(vm: Vm, host_buffer, field: str) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(4 * MIB)
    args = {"guest_phys_addr": 0, "memory_size": 2 * MIB, "userspace_addr": buf.address}
    args[field] += PAGE_SIZE // 2
    before = snapshot(vm)
    with pytest.raises(KvmError) as info:
        vm.add_memslot(**args)
    assert info.value.errno == errno.EINVAL
    assert field in str(info.value)
    assert snapshot(vm) == before


def test_kvm_itself_refuses_misaligned_slot(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    """The Python check mirrors KVM's rule: the raw ioctl is refused too."""
    import fcntl
    import struct

    buf = host_buffer(4 * MIB)
    raw = struct.pack("<IIQQQ", 0, 0, PAGE_SIZE // 2, 2 * MIB, buf.address)
    with pytest.raises(OSError) as info:
        fcntl.ioctl(vm.fd, lib.KVM_SET_USER_MEMORY_REGION, raw)
    assert info.value.errno == errno.EINVAL


def test_unmapped_host_memory_is_refused(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(2 * MIB)
    address = buf.address
    buf.close()
    before = snapshot(vm)
    with pytest.raises(KvmError) as info:
        vm.add_memslot(0, 2 * MIB, address)
    assert info.value.errno == errno.EFAULT
    assert "not (entirely) mapped" in str(info.value)
    assert snapshot(vm) == before
    assert vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"] == 0


def test_host_mapped_skips_the_check_that_kvm_does_not_make(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(2 * MIB)
    address = buf.address
    buf.close()
    slot = vm.add_memslot(0, 2 * MIB, address, host_mapped=True)   # KVM itself takes it
    assert vm.memslots[slot].userspace_addr == address
    assert vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"] == 1
    vm.delete_memslot(slot)


def test_slot_id_beyond_limit_is_refused(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(2 * MIB)
    before = snapshot(vm)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(vm.max_memslots, 0, 2 * MIB, buf.address)
    assert info.value.errno == errno.EINVAL
    assert str(vm.max_memslots) in str(info.value)
    assert snapshot(vm) == before


def test_exhausting_the_limit_gives_enospc(kvm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    """Fill every slot of a VM with tiny slots, then ask for one more."""
    with kvm.create_vm() as vm:
        buf = host_buffer(PAGE_SIZE)
        for i in range(vm.max_memslots):
            vm.set_user_memory_region(i, i * PAGE_SIZE, PAGE_SIZE, buf.address)
        assert vm.free_memslots == 0
        before = snapshot(vm)
        with pytest.raises(KvmError) as info:
            vm.add_memslot(vm.max_memslots * PAGE_SIZE, PAGE_SIZE, buf.address)
        assert info.value.errno == errno.ENOSPC
        assert snapshot(vm) == before
        vm.delete_memslot(7)
        assert vm.add_memslot(7 * PAGE_SIZE, PAGE_SIZE, buf.address) == 7


def test_resizing_an_existing_slot_is_refused(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(4 * MIB)
    slot = vm.add_memslot(0, 2 * MIB, buf.address)
    before = snapshot(vm)
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region(slot, 0, 4 * MIB, buf.address)
    assert info.value.errno == errno.EINVAL
    assert "delete it first" in str(info.value)
    assert snapshot(vm) == before


def test_deleting_unknown_slot_is_refused(vm: Vm) -> None:
    with pytest.raises(KvmError) as info:
        vm.delete_memslot(5)
    assert info.value.errno == errno.ENOENT
    assert vm.ioctl_counts["KVM_SET_USER_MEMORY_REGION"] == 0


def test_flags_change_in_place_and_dirty_log(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(2 * MIB)
    slot = vm.add_memslot(0, 2 * MIB, buf.address)
    vm.set_user_memory_region(slot, 0, 2 * MIB, buf.address, lib.KVM_MEM_LOG_DIRTY_PAGES)
    assert vm.memslots[slot].flags == lib.KVM_MEM_LOG_DIRTY_PAGES
    log = vm.get_dirty_log(slot)
    assert len(log) == (2 * MIB // PAGE_SIZE) // 8
    assert not any(log)  # no guest ran: nothing is dirty


def test_user_memory_region2_registers_a_slot(vm: Vm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    if not vm.has_user_memory2:
        pytest.skip("kernel has no KVM_CAP_USER_MEMORY2")
    buf = host_buffer(2 * MIB)
    vm.set_user_memory_region2(3, GIB, 2 * MIB, buf.address)
    assert vm.memslots[3].guest_phys_addr == GIB
    with pytest.raises(KvmError) as info:
        vm.set_user_memory_region2(4, GIB, 2 * MIB, buf.address)
    assert info.value.errno == errno.EEXIST and info.value.ioctl == "KVM_SET_USER_MEMORY_REGION2"
    vm.set_user_memory_region2(3, 0, 0, 0)
    assert 3 not in vm.memslots


def test_memslot_ioctl_on_closed_vm(kvm, host_buffer) -> None:  # type: ignore[no-untyped-def]
    buf = host_buffer(2 * MIB)
    vm = kvm.create_vm()
    vm.close()
    with pytest.raises(KvmError) as info:
        vm.add_memslot(0, 2 * MIB, buf.address)
    assert info.value.errno == errno.EBADF
    assert info.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert vm.used_memslots == 0
