"""Kernel-memory measurement in per-measurement memory cgroups.

The ``kvm`` tests measure real KVM memslot metadata in real cgroups (root);
the others check parsing, backend detection on fake cgroup trees, the child's
error path and the clean-up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmmem.measure import kmem
from kvmmem.memory import HostMemory

MIB, GIB = 1 << 20, 1 << 30


def _backend_or_skip() -> kmem.KmemBackend:
    try:
        return kmem.detect()
    except kmem.KmemUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise
        pytest.skip(str(exc))


# ------------------------------------------------------------ KVM measurements

def vm_with_slot(size: int) -> Iterator[int]:
    """A VM with one memslot of ``size`` bytes (none if 0), kept open while measured."""
    from kvmmem.kvm import Kvm

    with Kvm() as kvm, kvm.create_vm() as vm:
        if size == 0:
            yield 0
            return
        host = HostMemory(size)
        try:
            vm.add_memslot(0, size, host.address)
            yield vm.used_memslots
        finally:
            vm.close()
            host.close()


@pytest.fixture(scope="module")
def slot_costs() -> dict[int, kmem.Measurement]:
    backend = _backend_or_skip()
    return {size: kmem.measure(vm_with_slot, size, backend=backend) for size in (0, GIB, 64 * GIB)}


@pytest.mark.kvm
def test_each_measurement_saw_its_memslots(slot_costs: dict[int, kmem.Measurement]) -> None:
    assert [slot_costs[s].result for s in (0, GIB, 64 * GIB)] == [0, 1, 1]
    for m in slot_costs.values():
        assert m.backend in (kmem.CGROUP1, kmem.CGROUP2)
        assert m.seconds > 0
        if m.peak_kernel_bytes is not None:
            assert m.peak_kernel_bytes >= m.kernel_bytes


@pytest.mark.kvm
def test_64gib_memslot_costs_well_over_100mib(slot_costs: dict[int, kmem.Measurement]) -> None:
    extra = slot_costs[64 * GIB].kernel_bytes - slot_costs[0].kernel_bytes
    # Facts: about 160 MiB with the shadow MMU (twice that with SMM).
    assert 100 * MIB < extra < 1024 * MIB


@pytest.mark.kvm
def test_1gib_memslot_costs_a_few_mib(slot_costs: dict[int, kmem.Measurement]) -> None:
    extra = slot_costs[GIB].kernel_bytes - slot_costs[0].kernel_bytes
    assert 1 * MIB <= extra <= 5 * MIB


@pytest.mark.kvm
def test_cost_grows_with_slot_size_roughly_linearly(slot_costs: dict[int, kmem.Measurement]) -> None:
    empty, one, big = (slot_costs[s].kernel_bytes for s in (0, GIB, 64 * GIB))
    assert empty < one < big
    assert 32 <= (big - empty) / (one - empty) <= 128


@pytest.mark.kvm
def test_generator_reading_is_taken_before_cleanup() -> None:
    """A plain function that closes its VM leaves almost nothing charged."""
    backend = _backend_or_skip()

    def closed_after(size: int) -> int:
        for used in vm_with_slot(size):
            return used
        return -1

    kept = kmem.measure(vm_with_slot, 64 * GIB, backend=backend)
    closed = kmem.measure(closed_after, 64 * GIB, backend=backend)
    assert closed.result == kept.result == 1
    assert closed.kernel_bytes < kept.kernel_bytes - 100 * MIB
    if closed.peak_kernel_bytes is not None:  # cgroup1 still saw the slot's peak
        assert closed.peak_kernel_bytes > 100 * MIB


@pytest.mark.kvm
def test_probe_reads_several_times_in_one_process() -> None:
    from kvmmem.kvm import Kvm

    backend = _backend_or_skip()
    own = backend.cgroup_dir_of()
    host = HostMemory(64 * GIB)
    try:
        with kmem.KmemProbe(backend=backend) as probe, Kvm() as kvm, kvm.create_vm() as vm:
            assert backend.cgroup_dir_of() == probe.path
            before = probe.kernel_bytes()
            slot = vm.add_memslot(0, 64 * GIB, host.address)
            with_slot = probe.kernel_bytes()
            vm.delete_memslot(slot)
            after_delete = probe.kernel_bytes()
            path = probe.path
    finally:
        host.close()
    assert with_slot - before > 100 * MIB
    assert after_delete < with_slot - 100 * MIB
    assert backend.cgroup_dir_of() == own
    assert not path.exists()


# ------------------------------------------------------------ child errors and clean-up

def _fail(message: str) -> None:
    raise LookupError(message)


def test_failing_function_reports_the_childs_error_and_traceback() -> None:
    backend = _backend_or_skip()
    before = set(backend.parent.iterdir())
    with pytest.raises(kmem.MeasuredWorkError) as info:
        kmem.measure(_fail, "no such slot 42", backend=backend)
    assert info.value.exc_type == "LookupError"
    assert "no such slot 42" in str(info.value)
    assert "_fail" in info.value.child_traceback
    assert "Traceback" in info.value.child_traceback
    assert set(backend.parent.iterdir()) == before


def test_measurement_runs_in_a_fresh_cgroup_that_is_removed_afterwards() -> None:
    backend = _backend_or_skip()
    inside = kmem.measure(backend.cgroup_dir_of, backend=backend).result
    assert inside.parent == backend.parent
    assert inside.name.startswith("kvmmem-kmem-")
    assert not inside.exists()
    assert backend.cgroup_dir_of() == backend.parent  # this process never moved


def test_unpicklable_result_is_a_clear_error() -> None:
    backend = _backend_or_skip()
    with pytest.raises(kmem.MeasuredWorkError, match="cannot be pickled"):
        kmem.measure(lambda: (lambda: None), backend=backend)


def test_generator_must_yield_once() -> None:
    backend = _backend_or_skip()

    def twice() -> Iterator[int]:
        yield 1
        yield 2

    with pytest.raises(kmem.KmemError, match="exactly once"):
        kmem.measure(twice, backend=backend)


def test_child_killed_by_a_signal_is_reported() -> None:
    backend = _backend_or_skip()

    def die() -> None:
        os.kill(os.getpid(), 9)

    with pytest.raises(kmem.KmemError, match="SIGKILL"):
        kmem.measure(die, backend=backend)


def test_unprivileged_user_gets_kmem_unavailable() -> None:
    if os.geteuid() != 0:
        with pytest.raises(kmem.KmemUnavailable):
            kmem.detect()
        return
    _backend_or_skip()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # drop root in a child only
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            kmem.detect()
        except kmem.KmemUnavailable as exc:
            os.write(w, str(exc).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as reader:
        message = reader.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert "no permission" in message


def test_probe_rejects_a_bad_pid() -> None:
    for bad in (0, -3, "1", True):
        with pytest.raises(ValueError, match="pid"):
            kmem.KmemProbe(pid=bad)  # type: ignore[arg-type]


def test_probe_outside_a_with_block_is_an_error() -> None:
    with pytest.raises(kmem.KmemError, match="context manager"):
        kmem.KmemProbe().kernel_bytes()


# ------------------------------------------------------------ parsing and detection

MOUNTINFO = """\
22 1 0:20 / /sys rw,nosuid shared:7 - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
35 22 0:31 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory
36 22 0:32 / /sys/fs/cgroup/cpu\\040x rw,relatime shared:15 - cgroup cgroup rw,cpu
"""


def test_parse_mountinfo() -> None:
    mounts = kmem.parse_mountinfo(MOUNTINFO + "garbage line\n")
    assert [m.fstype for m in mounts] == ["sysfs", "cgroup2", "cgroup", "cgroup"]
    assert mounts[2].mount_point == Path("/sys/fs/cgroup/memory")
    assert "memory" in mounts[2].super_options
    assert mounts[3].mount_point == Path("/sys/fs/cgroup/cpu x")


def test_parse_proc_cgroup() -> None:
    paths = kmem.parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/c\n0::/d e\n")
    assert paths == {"memory": "/a/b", "cpu": "/c", "cpuacct": "/c", "": "/d e"}


def test_v2_kernel_bytes_prefers_kernel_then_sums_parts() -> None:
    assert kmem.v2_kernel_bytes({"kernel": 7, "slab": 100, "anon": 5}) == 7
    assert kmem.v2_kernel_bytes({"slab": 3, "vmalloc": 4, "percpu": 5, "anon": 100}) == 12
    with pytest.raises(kmem.KmemError, match="kernel"):
        kmem.v2_kernel_bytes({"anon": 1})


def test_no_memory_controller_anywhere_is_unavailable() -> None:
    text = "30 22 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
    with pytest.raises(kmem.KmemUnavailable) as info:
        kmem.detect(mountinfo=text, self_cgroup="1:cpu:/\n")
    assert "cgroup1: no cgroup v1 hierarchy with the memory controller" in str(info.value)
    assert "cgroup2: no cgroup2 (unified) hierarchy is mounted" in str(info.value)


def _fake_v2(tmp_path: Path, controllers: str, subtree: str, procs: str) -> tuple[str, str]:
    leaf = tmp_path / "svc"
    leaf.mkdir()
    (leaf / "cgroup.controllers").write_text(controllers)
    (leaf / "cgroup.subtree_control").write_text(subtree)
    (leaf / "cgroup.procs").write_text(procs)
    mountinfo = f"30 22 0:26 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n"
    return mountinfo, "0::/svc\n"


def test_v2_without_memory_controller_says_so(tmp_path: Path) -> None:
    mountinfo, own = _fake_v2(tmp_path, "cpu io hugetlb\n", "", "")
    with pytest.raises(kmem.KmemUnavailable, match=r"not available .*cpu io hugetlb"):
        kmem.detect(mountinfo=mountinfo, self_cgroup=own)


def test_v2_parent_with_its_own_processes_cannot_delegate(tmp_path: Path) -> None:
    mountinfo, own = _fake_v2(tmp_path, "cpu memory\n", "cpu\n", "4242\n")
    with pytest.raises(kmem.KmemUnavailable, match="no internal|processes of its own"):
        kmem.detect(mountinfo=mountinfo, self_cgroup=own)


def test_v2_backend_enables_memory_and_reads_memory_stat(tmp_path: Path) -> None:
    mountinfo, own = _fake_v2(tmp_path, "cpu memory\n", "", "")
    backend = kmem.detect(mountinfo=mountinfo, self_cgroup=own)
    assert backend.kind == kmem.CGROUP2 and backend.parent == tmp_path / "svc"
    cgroup = backend.create()
    assert "+memory" in (tmp_path / "svc" / "cgroup.subtree_control").read_text()
    assert cgroup.path.parent == tmp_path / "svc"
    (cgroup.path / "memory.stat").write_text("anon 4096\nkernel 123456\nslab 99\n")
    assert cgroup.kernel_bytes() == 123456
    assert cgroup.peak_kernel_bytes() is None
    (cgroup.path / "memory.stat").unlink()
    cgroup.remove()
    assert not cgroup.path.exists()


def test_explicit_parent_outside_any_hierarchy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(kmem.KmemUnavailable, match="not inside a mounted"):
        kmem.detect(tmp_path, mountinfo=MOUNTINFO, self_cgroup="4:memory:/\n0::/\n")
