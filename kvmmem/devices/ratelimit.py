"""Rate limits for log lines a guest can trigger at will.

A guest can repeat a request that makes the VMM log (a plug that goes over
the memslot budget, a request that fails on the host, an access to
unplugged memory) as fast as it likes. Like the kernel's
``printk_ratelimit``, such a line is written at most once per interval, and
the next one that is written says how many were held back meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["LOG_INTERVAL", "RateLimit"]

LOG_INTERVAL = 1.0
"""Seconds between two log lines of one kind."""


class RateLimit:
    """Lets one event per ``interval`` through and counts the others."""

    def __init__(self, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._next = float("-inf")
        self._suppressed = 0

    def check(self) -> int | None:
        """None while the limit holds (the event is counted); else how many
        were held back since the last one that passed."""
        now = self.clock()
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        held, self._suppressed = self._suppressed, 0
        return held

    @staticmethod
    def note(held: int) -> str:
        """What to append to a line after ``held`` were held back."""
        return f" ({held} more not logged since the last such line)" if held else ""
