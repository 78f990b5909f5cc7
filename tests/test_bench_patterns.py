"""The plug patterns of the benchmark and how their targets are judged (no KVM)."""

from __future__ import annotations

import pytest

from kvmmem.measure.bench_patterns import (
    GIB,
    MIB,
    PatternCase,
    floor_memslots,
    format_patterns,
    pattern_requests,
    pattern_targets,
)


def test_patterns_are_what_their_names_say() -> None:
    contiguous = pattern_requests("contiguous")
    assert contiguous == [(i * 128 * MIB, 128 * MIB) for i in range(8)]
    scattered = pattern_requests("scattered")
    assert len(scattered) == 512 and sum(size for _, size in scattered) == GIB
    assert {offset // GIB for offset, _ in scattered} == set(range(512))     # one per GiB
    linux = pattern_requests("linux")
    assert len(linux) == 512 and linux[-1] == (64 * GIB - 128 * MIB, 128 * MIB)
    assert floor_memslots("linux") == [(0, 64 * GIB)] and floor_memslots("scattered") == scattered
    with pytest.raises(ValueError, match="unknown pattern 'diagonal'"):
        pattern_requests("diagonal")


def cases(exact_scattered: int, exact_linux_slots: int, exact_us: float) -> list[PatternCase]:
    return [
        PatternCase("scattered", "floor", memslots=512, kernel_bytes=12 * MIB),
        PatternCase("scattered", "exact", 512, 512, exact_scattered, [500.0]),
        PatternCase("contiguous", "dynamic", 8, 1, 2 * MIB, [100.0]),
        PatternCase("contiguous", "exact", 8, 1, 2 * MIB, [150.0]),
        PatternCase("linux", "dynamic", 512, 64, 161 * MIB, [100.0, 120.0, 110.0]),
        PatternCase("linux", "exact", 512, exact_linux_slots, 160 * MIB, [exact_us], 35, [40.0],
                    merge_ms=[51.2], memslots_before_merge=512, kernel_bytes_before_merge=170 * MIB),
    ]


def test_targets_met_and_missed() -> None:
    met = {t: ok for t, _, ok in pattern_targets(cases(15 * MIB, 8, 200.0))}
    assert all(met.values()) and len(met) == 5       # no merge times for dynamic: no total
    missed = {t: ok for t, _, ok in pattern_targets(cases(16 * MIB, 9, 230.0))}
    assert [t for t, ok in missed.items() if not ok] == [
        "scattered 1 GiB: exact <= 1.25x the floor", "64 GiB in 128 MiB steps: <= 8 memslots",
        "host time per 128 MiB request: exact <= 2x dynamic"]


def test_the_table_shows_the_hole_and_the_ratio_to_the_floor() -> None:
    text = format_patterns(cases(15 * MIB, 8, 200.0), 1 << 40)
    # 512 memslots before the deferred merge, 8 after; 51.2 ms of merging is 100 us per request
    assert "| linux | exact | 512 | 8 (512) | 160.0 (170.0) | - | 200 (200) | 51.2 | 300 " \
        "| 35, 40.0 ms |" in text
    assert "| scattered | exact | 512 | 512 | 15.0 | 1.25x | 500 (500) | - | - |  |" in text


def test_the_merges_are_reported_beside_the_request_time() -> None:
    cs = cases(15 * MIB, 8, 200.0)
    cs[4].merge_ms = [0.0, 0.0, 0.0]                 # dynamic defers nothing
    targets = {t: (m, ok) for t, m, ok in pattern_targets(cs)}
    assert targets["(for the record) with the deferred merges: exact / dynamic"] == \
        ("300 us vs 110 us = 2.73x", True)


def test_request_times_are_compared_run_by_run() -> None:
    """Runs alternate between the modes: a slow second run slows both, and
    the per-run ratios (2.0, 1.88, 2.1) have a median of 2.0 where the
    medians alone (210 / 100) would say 2.1."""
    cs = cases(15 * MIB, 8, 0.0)
    cs[4].request_us = [100.0, 160.0, 100.0]
    cs[5].request_us = [200.0, 300.0, 210.0]
    (measured, ok), = [(m, ok) for t, m, ok in pattern_targets(cs) if t.startswith("host time")]
    assert measured == "210 us vs 100 us; median of per-run ratios 2.00x, runs 1.88-2.10x"
    assert ok
