"""The seed's `info mtree` listings, as test data."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "seed-mtree.txt"


def seed_listings() -> list[list[str]]:
    """Four listings (requested 0, 2 GiB, 20 GiB, then 5 GiB after a reboot),
    each a list of lines exactly as QEMU printed them."""
    text = "\n".join(l for l in DATA.read_text().splitlines() if not l.startswith("#"))
    return [block.strip("\n").splitlines() for block in text.split("\n\n") if block.strip()]
