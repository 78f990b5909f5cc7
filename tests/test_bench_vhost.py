"""scripts/bench_vhost.py's logic on a real KVM VM and a real qemu-storage-daemon, briefly."""

from __future__ import annotations

from pathlib import Path

import pytest
from vhost_helpers import start_backend

from kvmmem.measure.bench_vhost import io_pauses

pytestmark = [pytest.mark.kvm, pytest.mark.vhost, pytest.mark.slow]


def test_io_pauses_under_a_busy_disk(tmp_path: Path) -> None:
    backend = start_backend(tmp_path, bps=16 << 20)
    try:
        r = io_pauses(backend, cycles=3)
    finally:
        backend.kill()
    # every merge and split stopped the back-end once, and no request failed or went astray
    assert r["changes"] == 6 and len(r["pauses_s"]) == 6
    assert r["requests"] > 0 and r["failed"] == 0 and r["image_ok"]
