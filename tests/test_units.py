"""kvmmem.units: one size parser, the bare number's unit chosen per call site."""

from __future__ import annotations

import pytest

from kvmmem.units import GiB, MiB, SizeError, parse_size


@pytest.mark.parametrize("text, unit, size", [
    ("512", 1, 512), ("512", MiB, 512 * MiB), ("1", GiB, GiB), ("0", GiB, 0),
    ("0x10", MiB, 16 * MiB), ("1.5", GiB, 3 * GiB // 2), ("1.5G", 1, 3 * GiB // 2),
    ("4096B", MiB, 4096), ("2m", GiB, 2 * MiB),
])
def test_a_suffix_wins_and_a_bare_number_counts_the_callers_unit(text: str, unit: int,
                                                                  size: int) -> None:
    assert parse_size(text, default_unit=unit) == size


@pytest.mark.parametrize("text, unit", [("", 1), ("G", 1), ("-1", MiB), ("0.3K", 1), ("1X", 1),
                                        ("1.5", 1), ("16E", MiB), ("17592186044416", MiB)])
def test_garbage_fractions_of_a_byte_and_2_to_the_64_are_refused(text: str, unit: int) -> None:
    with pytest.raises(SizeError):
        parse_size(text, default_unit=unit)
