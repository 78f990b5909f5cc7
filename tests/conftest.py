"""Shared fixtures and the ``kvm`` and ``linux`` marker policy.

Tests marked ``kvm`` use the real ``/dev/kvm``; tests marked ``linux`` boot
the Linux test kernel (``make linux-guest``) under KVM. Where KVM or the
kernel is missing they are skipped with the reason, except under ``CI=true``
or ``KVMMEM_REQUIRE_KVM=1``, where such a skip would hide untested code and
is turned into a failure.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

KVM_REQUIRED = os.environ.get("CI", "").lower() == "true" or os.environ.get("KVMMEM_REQUIRE_KVM") == "1"
KVM_MARKERS = ("kvm", "linux")
"""Markers of tests that need a usable /dev/kvm."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm: the test needs a usable /dev/kvm")
    config.addinivalue_line("markers", "vhost: the test needs qemu-storage-daemon "
                            "(qemu-system-common, with qemu-utils)")
    config.addinivalue_line("markers", "linux: the test boots the Linux test kernel (make test-linux)")
    config.addinivalue_line("markers", "slow: the test waits out back-end I/O or deadlines on "
                            "purpose (make test-slow)")


# Markers of tests that may skip locally but never under CI.
REQUIRED_UNDER_CI = ("kvm", "vhost", "linux")


def _kvm_unavailable_reason() -> str | None:
    try:
        from kvmmem.kvm import kvm_available
    except ImportError as exc:
        return f"kvmmem's KVM bindings cannot be imported: {exc}"
    return kvm_available()


_REASON: list[str | None] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    if not any(item.get_closest_marker(name) is not None for name in KVM_MARKERS):
        return
    if not _REASON:
        _REASON.append(_kvm_unavailable_reason())
    reason = _REASON[0]
    if reason is None:
        return
    if KVM_REQUIRED:
        pytest.fail(f"KVM test cannot run and KVM is required here (CI): {reason}", pytrace=False)
    pytest.skip(f"no usable KVM: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under CI, any skip of a KVM, vhost or Linux test (a capability or program missing, say) fails it."""
    outcome = yield
    report = outcome.get_result()
    if KVM_REQUIRED and report.skipped and any(item.get_closest_marker(m) is not None
                                               for m in REQUIRED_UNDER_CI):
        report.outcome = "failed"
        report.longrepr = f"test skipped where it is required (CI): {report.longrepr}"


@pytest.fixture
def kvm() -> Iterator[object]:
    from kvmmem.kvm import Kvm

    with Kvm() as handle:
        yield handle


@pytest.fixture
def vm(kvm) -> Iterator[object]:  # type: ignore[no-untyped-def]
    with kvm.create_vm() as handle:
        yield handle


@pytest.fixture
def host_buffer() -> Iterator[callable]:  # type: ignore[valid-type]
    """Makes anonymous host mappings (HostMemory) for memslots; unmapped after the test."""
    from kvmmem.memory import HostMemory

    buffers: list[HostMemory] = []

    def make(size: int) -> HostMemory:
        buffers.append(HostMemory(size))
        return buffers[-1]

    yield make
    for b in buffers:
        if not b.closed:
            b.close()


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    """The test guest, built (or found up to date) by its make fragment."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["make", "-s", "-f", "tests/guest/Makefile.inc", "build/guest/guest.elf"],
                   cwd=root, check=True)
    return root / "build" / "guest" / "guest.elf"
