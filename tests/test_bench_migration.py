"""scripts/bench_migration.py's case on real KVM, in a memory cgroup, briefly:
the hammering test guest migrated into /dev/null and into a file, then restored."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmmem.measure import kmem
from kvmmem.measure.bench_migration import migration_case

pytestmark = pytest.mark.kvm
MIB, GIB = 1 << 20, 1 << 30


@pytest.mark.parametrize("device_size", [64 * GIB, 64 << 40], ids=["64G", "64T"])
def test_a_migration_case_measures_what_it_sends(guest_elf: Path, tmp_path: Path,
                                                 device_size: int) -> None:
    try:
        backend = kmem.detect()
    except kmem.KmemUnavailable as exc:
        pytest.skip(f"no memory cgroup to measure in: {exc}")
    plugged = 256 * MIB
    r = kmem.measure(migration_case, backend, "exact", device_size, plugged, guest_elf,
                     str(tmp_path / "stream"), backend=backend).result
    assert r["plugged"] == plugged and r["passes"] >= 1
    # the two hammered pages of each 2 MiB block at least, never unplugged
    # memory, and what the guest touched of its boot RAM: the same for any
    # device size (the loader's page tables once covered all of maxmem,
    # 256 MiB of them for 64 TiB)
    assert plugged // (2 * MIB) * 2 * 4096 <= r["stream"] <= 16 * MIB, r["stream"]
    assert r["downtime_ms"] <= r["total_ms"] and r["restore_ms"] > 0
