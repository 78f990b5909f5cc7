"""A short soak (scripts/soak.py): file descriptors, threads and memslots of a
running ``kvmmem run`` are the same after many resize cycles, resets and QMP
client connects as after the first ones. RSS is measured by the script,
not asserted here."""

from __future__ import annotations

import pytest

from kvmmem.measure import soak

pytestmark = pytest.mark.kvm


def test_fds_threads_and_memslots_stay_flat_over_resizes_resets_and_connects(guest_elf) -> None:  # type: ignore[no-untyped-def]
    samples = soak.soak(guest_elf, cycles=30, reset_every=5, connects=3)
    assert [s.cycle for s in samples] == list(range(30))
    assert samples[-1].resets == 6 and samples[-1].connects == 90
    first = samples[2]
    for s in samples[2:]:
        assert (s.fds, s.threads, s.memslots) == (first.fds, first.threads, first.memslots), s
    assert soak.drift(samples, 2)["memslots"] == 0


@pytest.mark.vhost
@pytest.mark.slow
def test_fds_and_threads_stay_flat_while_the_disks_backend_comes_and_goes(guest_elf) -> None:  # type: ignore[no-untyped-def]
    samples = soak.soak(guest_elf, cycles=12, reset_every=4, connects=1, vhost_restart_every=2)
    assert samples[-1].restarts == 6 and samples[-1].resets == 3
    first = samples[2]
    for s in samples[2:]:
        assert (s.fds, s.threads, s.memslots) == (first.fds, first.threads, first.memslots), s
