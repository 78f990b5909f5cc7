"""scripts/bench_dirty_log.py's cases on real KVM, in memory cgroups, with a 64 GiB device."""

from __future__ import annotations

import pytest

from kvmmem.measure import kmem
from kvmmem.measure.bench_dirty_log import logging_case

pytestmark = pytest.mark.kvm
GIB = 1 << 30


def test_logging_costs_what_is_mapped_not_the_device() -> None:
    try:
        backend = kmem.detect()
    except kmem.KmemUnavailable as exc:
        pytest.skip(f"no memory cgroup to measure in: {exc}")
    dynamic = kmem.measure(logging_case, backend, "dynamic", "contiguous", 64 * GIB,
                           backend=backend).result
    single = kmem.measure(logging_case, backend, "single", "contiguous", 64 * GIB,
                          backend=backend).result
    # KVM's dirty bitmaps for 1 GiB of boot RAM and one 1 GiB memslot, against
    # one for the whole 64 GiB device: 2 bits per page of each logged memslot
    assert dynamic["kernel"] < single["kernel"]
    assert single["kernel"] - dynamic["kernel"] >= 63 * GIB // 4096 // 8
    # the VMM's own bitmaps: one bit per page of 1 GiB of boot RAM and 1 GiB plugged
    assert dynamic["bitmap"] == 2 * GIB // 4096 // 8 == single["bitmap"]
