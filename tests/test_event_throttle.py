"""QMP event throttling as QEMU's monitor does it (pure logic, time passed in)."""

from __future__ import annotations

import threading

from kvmmem.vmm.event_throttle import EventThrottle, Rate, ThrottleState
from kvmmem.vmm.qmp_commands import EVENT_RATES, UNPLUGGED_ACCESS_EVENT

SIZE = "MEMORY_DEVICE_SIZE_CHANGE"


def _size(dev: str, size: int) -> dict[str, object]:
    return {"id": dev, "size": size, "qom-path": f"/machine/peripheral/{dev}"}


def test_first_event_goes_out_the_last_of_a_period_is_sent_when_it_ends() -> None:
    state = ThrottleState({"E": Rate(1.0)})
    assert state.offer("E", {"n": 0}, now=10.0)
    assert [state.offer("E", {"n": n}, now=10.0 + n / 1000) for n in range(1, 500)] == \
        [False] * 499
    assert state.due(10.9) == [] and state.next_deadline() == 11.0
    assert state.due(11.0) == [("E", {"n": 499})]              # the latest, once
    assert not state.offer("E", {"n": 500}, now=11.5)          # a new period began at 11.0
    assert state.due(12.0) == [("E", {"n": 500})]
    assert state.due(13.0) == [] and state.open_periods == 0   # nothing held: period closed
    assert state.offer("E", {"n": 501}, now=13.1)              # so the next goes out at once


def test_size_changes_are_throttled_per_device_other_events_not_at_all() -> None:
    state = ThrottleState(EVENT_RATES)
    assert state.offer(SIZE, _size("a", 1), 0.0) and state.offer(SIZE, _size("b", 1), 0.0)
    assert not state.offer(SIZE, _size("a", 2), 0.1) and not state.offer(SIZE, _size("a", 3), 0.2)
    assert not state.offer(SIZE, _size("b", 2), 0.3)
    assert all(state.offer("STOP", None, 0.4) for _ in range(3))
    assert state.offer(UNPLUGGED_ACCESS_EVENT, {"address": 1}, 0.5)
    assert not state.offer(UNPLUGGED_ACCESS_EVENT, {"address": 2}, 0.6)
    assert sorted(state.due(1.0), key=str) == [(SIZE, _size("a", 3)), (SIZE, _size("b", 2))]
    assert state.due(1.5) == [(UNPLUGGED_ACCESS_EVENT, {"address": 2})]


def test_the_throttle_thread_sends_held_events_when_their_period_ends() -> None:
    now = [0.0]
    sent: list[tuple[str, object]] = []
    done = threading.Event()

    def emit(event: str, data: object) -> None:
        sent.append((event, data))
        if len(sent) == 2:
            done.set()

    throttle = EventThrottle(emit, {"E": Rate(0.05)}, clock=lambda: now[0])
    try:
        throttle.emit("E", {"n": 1})
        throttle.emit("E", {"n": 2})
        throttle.emit("E", {"n": 3})
        assert sent == [("E", {"n": 1})]
        now[0] = 1.0                                  # the period is over
        assert done.wait(30)
        assert sent == [("E", {"n": 1}), ("E", {"n": 3})]
    finally:
        throttle.close()
