"""Sizes as QEMU spells them: 512M, 2G, 1T, 0x1000, or a bare number.

What a bare number counts differs per option in QEMU, so the caller says:
bytes for properties and object sizes (``qemu_strtosz``), MiB for the ``-m``
size (``qemu_strtosz_MiB``); the benchmarks count GiB.
"""

from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["KiB", "MiB", "GiB", "TiB", "SIZE_LIMIT", "SizeError", "format_size", "mib",
           "parse_size"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_SUFFIXES = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1 << 50, "E": 1 << 60}
# QEMU's qemu_strtosz (util/cutils.c): a decimal number, optionally with a
# fraction, or a hexadecimal integer, then an optional unit suffix. No sign,
# no exponent, no inf/nan, ASCII digits only.
_SIZE = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)([BKMGTPEbkmgtpe]?)", re.ASCII)
SIZE_LIMIT = 1 << 64
"""Sizes are below 2^64, as QEMU's (a uint64)."""


class SizeError(ValueError):
    """Text that is not a size; ``reason`` says why, without the text."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(f"{text!r} is not a size: {reason}")
        self.reason = reason


def parse_size(text: str, *, default_unit: int = 1) -> int:
    """``"2G"`` -> 2147483648; a number without a suffix counts ``default_unit``
    bytes (hex with 0x).

    Raises SizeError (a ValueError) saying why for anything else: a sign, an exponent,
    inf or nan, an unknown suffix, a fraction of a byte, or 2^64 or more.
    """
    value = text.strip()
    m = _SIZE.fullmatch(value)
    if m is None:
        why = "negative sizes are not allowed" if value.startswith("-") else \
            "expected a non-negative number with an optional suffix B, K, M, G, T, P or E"
        raise SizeError(text, why)
    number: str = m[1]
    suffix: str = m[2]
    amount = Decimal(int(number, 16)) if number[:2].lower() == "0x" else Decimal(number)
    result = amount * (_SUFFIXES[suffix.upper()] if suffix else default_unit)
    if result != result.to_integral_value():
        raise SizeError(text, "not a whole number of bytes")
    if result >= SIZE_LIMIT:
        raise SizeError(text, "too large (sizes are below 2^64 bytes)")
    return int(result)


def format_size(size: int) -> str:
    """The largest unit that divides ``size`` exactly: 2G, 1536M, 4096."""
    for suffix in ("P", "T", "G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if size and size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def mib(size: int) -> str:
    """Bytes as MiB with one decimal, for reports."""
    return f"{size / (1 << 20):.1f} MiB"
