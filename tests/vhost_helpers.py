"""Helpers for the vhost-user tests: a real qemu-storage-daemon back-end, and a
host-side virtio-blk driver that programs the device through its virtio-mmio
registers and puts requests into a split ring in guest RAM, as a guest would."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmmem.measure import vhost_disk
from kvmmem.measure.vhost_disk import (  # noqa: F401  (re-exported for the tests)
    QSD,
    SECTOR,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Backend,
    HostBlkDriver,
    is_listening,
)
from kvmmem.memory import HostMemory

MiB = 1 << 20
GiB = 1 << 30


def need_qsd() -> str:
    """The daemon's path, or skip (under CI the conftest hook turns this into a failure)."""
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed (Debian 12 package qemu-system-common, "
                    "with qemu-utils)")
    return QSD


def shared_ram(size: int, name: str = "pc.ram") -> HostMemory:
    return HostMemory(size, name, shared=True)


def start_backend(directory: Path, name: str = "disk", size: int = 64 * MiB,
                  bps: int = 0) -> Backend:
    """:func:`kvmmem.measure.vhost_disk.start_backend`, skipped where the daemon is missing."""
    need_qsd()
    return vhost_disk.start_backend(directory, name, size, bps)
