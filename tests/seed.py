"""The `info mtree` listings of QEMU's RFC "virtio-mem: Expose device memory via separate
memslots" (2021; the seed of this project), as test data."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "seed-mtree.txt"


def seed_listings() -> list[list[str]]:
    """Four listings (requested 0, 2 GiB, 20 GiB, then 5 GiB after a reboot),
    each a list of lines exactly as QEMU printed them."""
    text = "\n".join(line for line in DATA.read_text().splitlines() if not line.startswith("#"))
    return [block.strip("\n").splitlines() for block in text.split("\n\n") if block.strip()]
