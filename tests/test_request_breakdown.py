"""The summary of scripts/bench_request_breakdown.py (no KVM: made-up runs)."""

from __future__ import annotations

from kvmmem.measure.request_breakdown import Breakdown, Calls, _kind, summary

MIB, GIB = 1 << 20, 1 << 30


def test_calls_are_filed_by_kind() -> None:
    assert [_kind(s) for s in (0, 2 * MIB, 128 * MIB, GIB, 8 * GIB)] == \
        ["delete", "create 2 MiB", "create 128 MiB", "create 1 GiB", "create 8 GiB"]


def test_summary_splits_binding_and_python_per_request() -> None:
    runs = [Breakdown("dynamic", 512, 512 * 100e-6, {"create 1 GiB": Calls(64, 64 * 640e-6)},
                      memory_s=512 * 86e-6),
            Breakdown("exact", 512, 512 * 200e-6, {"create 128 MiB": Calls(512, 512 * 100e-6)},
                      0.065, {"delete": Calls(512, 512 * 40e-6), "create 8 GiB": Calls(8, 0.036)},
                      memory_s=512 * 150e-6)]
    assert summary(runs) == [
        "dynamic: 100 us per request = 80 us in the KVM binding + 20 us of Python, 6 of them in "
        "the memory layer's memslot changes (1 runs, medians)",
        "   request: create 1 GiB: 0.125 per request, 640 us each",
        "exact: 200 us per request = 100 us in the KVM binding + 100 us of Python, 50 of them in "
        "the memory layer's memslot changes (1 runs, medians)",
        "   request: create 128 MiB: 1 per request, 100 us each",
        "   merge: create 8 GiB: 8 in the merge, 4500 us each",
        "   merge: delete: 512 in the merge, 40 us each",
        "   deferred merge: 65.0 ms"]
