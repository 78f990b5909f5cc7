"""Sizes as QEMU spells them: 512M, 2G, 1T, 64GiB, or a bare number.

What a bare number counts differs per option in QEMU, so the caller says:
bytes for properties and object sizes (``qemu_strtosz``), MiB for ``-m``
(``qemu_strtosz_MiB``); the benchmarks count GiB.
"""

from __future__ import annotations

import re

__all__ = ["KiB", "MiB", "GiB", "TiB", "format_size", "mib", "parse_size"]

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

_SUFFIXES = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": 1 << 50}
# A decimal or (bare) hex number, then an optional unit: K, M, G, T, P (binary,
# optionally followed by B or iB, any case) or B.
_SIZE = re.compile(r"\s*(?:(0x[0-9a-f]+)|(\d+(?:\.\d*)?))\s*(?:([kmgtp])(?:i?b)?|(b))?\s*",
                   re.IGNORECASE)


def parse_size(text: str, *, default_unit: int = 1) -> int:
    """``"2G"`` -> 2147483648. A bare number counts ``default_unit`` bytes
    (hex with 0x); a fraction needs a unit and must come to whole bytes."""
    match = _SIZE.fullmatch(text)
    if match is None or (match[1] and (match[3] or match[4])):
        raise ValueError(f"{text!r} is not a size (examples: 512M, 2G, 1T)")
    hex_digits: str | None
    decimal: str
    unit: str | None
    byte: str | None
    hex_digits, decimal, unit, byte = match.groups()
    if hex_digits:
        return int(hex_digits, 16) * default_unit
    if unit is None and byte is None:
        if "." in decimal:
            raise ValueError(f"{text!r} is not a size (examples: 512M, 2G, 1T)")
        return int(decimal) * default_unit
    scale = _SUFFIXES[unit.upper() if unit else "B"]
    whole, _, fraction = decimal.partition(".")
    numerator = int(whole + fraction) * scale
    denominator: int = 10 ** len(fraction)
    if numerator % denominator:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return numerator // denominator


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
