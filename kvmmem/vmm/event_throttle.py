"""QMP event rate limiting, as QEMU's monitor does it.

QEMU throttles some events (monitor/monitor.c, ``monitor_qapi_event_queue``
and ``monitor_qapi_event_throttle``): the first one of a period goes out at
once; the ones that follow within the period are not sent, but the last of
them is kept and sent when the period ends, which starts a new period. A
client thus gets at most one such event per period and always the latest
state. Some events are throttled per key rather than per name
(``qapi_event_throttle_equal``): MEMORY_DEVICE_SIZE_CHANGE per device
(``qom-path``), so one device's resizing does not hide another's.

:class:`ThrottleState` is the pure logic (time comes in as an argument);
:class:`EventThrottle` drives it with a thread that sends what falls due.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Emit = Callable[[str, "dict[str, Any] | None"], None]
Key = tuple[str, Any]


@dataclass(frozen=True)
class Rate:
    """One throttled event: its period and the data member it is keyed by."""

    period: float
    key: str | None = None


class ThrottleState:
    """Which events to send now and which later, for events throttled by ``rates``."""

    def __init__(self, rates: Mapping[str, Rate]) -> None:
        self.rates = dict(rates)
        self._periods: dict[Key, tuple[float, dict[str, Any] | None, bool]] = {}
        """Open periods: key -> (end, data of the last event held, whether one is held)."""

    def _key(self, event: str, data: dict[str, Any] | None) -> Key:
        rate = self.rates[event]
        return (event, (data or {}).get(rate.key) if rate.key else None)

    def offer(self, event: str, data: dict[str, Any] | None, now: float) -> bool:
        """Whether ``event`` goes out now; if not, it is held for the period's end."""
        rate = self.rates.get(event)
        if rate is None or rate.period <= 0:
            return True
        key = self._key(event, data)
        period = self._periods.get(key)
        if period is None:
            self._periods[key] = (now + rate.period, None, False)
            return True
        self._periods[key] = (period[0], data, True)          # the latest one wins
        return False

    def due(self, now: float) -> list[tuple[str, dict[str, Any] | None]]:
        """The held events whose period has ended, each starting a new period;
        periods that ended with nothing held are closed."""
        out = []
        for key, (end, data, held) in list(self._periods.items()):
            if end > now:
                continue
            if held:
                out.append((key[0], data))
                self._periods[key] = (now + self.rates[key[0]].period, None, False)
            else:
                del self._periods[key]
        return out

    def next_deadline(self) -> float | None:
        return min((end for end, _, _ in self._periods.values()), default=None)

    @property
    def open_periods(self) -> int:
        return len(self._periods)


QEMU_RATES = {
    # Of the events QEMU's monitor_qapi_event_init throttles to one a second
    # (RTC_CHANGE, WATCHDOG, BALLOON_CHANGE, ...), the one kvmmem raises.
    "MEMORY_DEVICE_SIZE_CHANGE": Rate(1.0, key="qom-path"),
}


class EventThrottle:
    """Sends events through ``emit``, holding back throttled ones; a daemon
    thread sends the held ones when their period ends."""

    def __init__(self, emit: Emit, rates: Mapping[str, Rate],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._clock = clock
        self._state = ThrottleState(rates)
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="qmp-event-throttle",
                                        daemon=True)
        self._thread.start()

    def emit(self, event: str, data: dict[str, Any] | None) -> None:
        """Send ``event`` now, or hold it (any thread; never waits on I/O)."""
        with self._cond:
            if self._closed:
                return
            now_ok = self._state.offer(event, data, self._clock())
            self._cond.notify()
        if now_ok:
            self._emit(event, data)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    deadline = self._state.next_deadline()
                    now = self._clock()
                    if deadline is not None and deadline <= now:
                        break
                    self._cond.wait(None if deadline is None else deadline - now)
                if self._closed:
                    return
                ready = self._state.due(self._clock())
            for event, data in ready:
                self._emit(event, data)

    def close(self) -> None:
        """Stop; events still held are dropped (QEMU drops them at exit too)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()
