"""kvmmem.units: one size parser, the bare number's unit chosen per call site."""

from __future__ import annotations

import pytest

from kvmmem.units import GiB, MiB, TiB, parse_size


@pytest.mark.parametrize("text, unit, size", [
    ("512", 1, 512), ("512", MiB, 512 * MiB), ("1", GiB, GiB), ("0", GiB, 0),
    ("0x10", MiB, 16 * MiB), ("64TiB", GiB, 64 * TiB), ("16 gib", 1, 16 * GiB),
    ("1.5G", 1, 3 * GiB // 2), ("4096B", MiB, 4096), ("2m", GiB, 2 * MiB),
])
def test_sizes_with_and_without_units(text: str, unit: int, size: int) -> None:
    assert parse_size(text, default_unit=unit) == size


@pytest.mark.parametrize("text", ["", "G", "-1", "1.5", "0x1G", "0.3K", "1X", "1 2G"])
def test_garbage_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text, default_unit=GiB)
