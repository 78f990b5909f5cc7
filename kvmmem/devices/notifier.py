"""Notifier lists: any number of observers subscribe to one kind of event.

QEMU's ``NotifierList`` (``include/qemu/notify.h``): the object that owns an
event calls :meth:`Notifier.notify`; observers ``add`` and ``remove``
themselves, and the owner never knows who listens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Notifier(Generic[T]):
    """Observers of one event, each called with the event's argument, in subscription order."""

    def __init__(self) -> None:
        self._observers: list[Callable[[T], None]] = []

    def add(self, observer: Callable[[T], None]) -> Callable[[T], None]:
        """Subscribe ``observer``; returns it, for :meth:`remove`."""
        self._observers.append(observer)
        return observer

    def remove(self, observer: Callable[[T], None]) -> None:
        """Unsubscribe ``observer`` (ValueError when it is not subscribed)."""
        self._observers.remove(observer)

    def __contains__(self, observer: object) -> bool:
        return observer in self._observers

    def __len__(self) -> int:
        return len(self._observers)

    def notify(self, arg: T) -> None:
        """Call every observer; one that raises does not stop the others, and
        the first exception is raised once all were called."""
        error: BaseException | None = None
        for observer in tuple(self._observers):
            try:
                observer(arg)
            except BaseException as exc:     # noqa: BLE001 - re-raised below
                error = error or exc
        if error is not None:
            raise error
