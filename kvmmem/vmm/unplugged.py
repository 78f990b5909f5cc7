"""Guest accesses to device memory that no plugged block backs: counted,
the most recent kept, the log rate-limited.

A guest may touch unplugged memory in a loop (a bug, or on purpose), each
access an exit to the VMM. What the VMM keeps of them must stay bounded: a
count, the last ``keep`` accesses, and at most one log line per interval
saying how many were not logged since the last line (as the kernel's
``printk_ratelimit`` says "N callbacks suppressed").
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmmem.devices.ratelimit import LOG_INTERVAL, RateLimit

KEEP = 64
"""Accesses kept in :attr:`UnpluggedAccessLog.recent`."""


@dataclass(frozen=True)
class UnpluggedAccess:
    """A guest access to device memory no plugged block backs."""

    device: str
    address: int
    vcpu: int
    is_write: bool


def describe(access: UnpluggedAccess) -> str:
    return (f"vCPU {access.vcpu}: {'write' if access.is_write else 'read'} of "
            f"unplugged/unassigned memory at {access.address:#x}"
            + (f" ({access.device})" if access.device else ""))


class UnpluggedAccessLog:
    """The count of unplugged accesses, the most recent ones, and when to log."""

    def __init__(self, keep: int = KEEP, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = 0
        """Accesses since the machine was created."""
        self.recent: collections.deque[UnpluggedAccess] = collections.deque(maxlen=keep)
        """The last ``keep`` accesses, oldest first."""
        self._limit = RateLimit(interval, clock)

    def record(self, access: UnpluggedAccess) -> str | None:
        """Count and keep ``access``; the line to log for it, or None while
        the log is rate-limited."""
        self.count += 1
        self.recent.append(access)
        held = self._limit.check()
        if held is None:
            return None
        line = describe(access)
        if held:
            line += f" ({held} more not logged since the last such line; {self.count} in all)"
        return line
