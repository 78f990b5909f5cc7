"""Sizes as QEMU spells them on the command line: 512M, 2G, 1T, or bytes."""

from __future__ import annotations

_SUFFIXES = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """``"2G"`` -> 2147483648; a plain number is bytes (hex with 0x)."""
    value = text.strip()
    suffix = value[-1:].upper() if value[-1:].isalpha() else ""
    number = value[:-1] if suffix else value
    try:
        amount = int(number, 0) if not suffix else float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 2G, 1T)") from None
    if suffix not in _SUFFIXES or amount < 0:
        raise ValueError(f"{text!r} is not a size (examples: 512M, 2G, 1T)")
    result = int(amount * _SUFFIXES[suffix])
    if result != amount * _SUFFIXES[suffix]:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return result


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
