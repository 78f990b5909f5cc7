"""Notifier lists: any number of observers subscribe to one kind of event.

QEMU's ``NotifierList`` (``include/qemu/notify.h``): the object that owns an
event calls :meth:`Notifier.notify`; observers ``add`` and ``remove``
themselves, and the owner never knows who listens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Notifier(list[Callable[[T], None]], Generic[T]):
    """Observers of one event, each called with the event's argument, in
    subscription order. A list, so that ``if notifiers:`` costs no call on
    paths where nobody listens."""

    def add(self, observer: Callable[[T], None]) -> Callable[[T], None]:
        """Subscribe ``observer``; returns it, for :meth:`remove`."""
        self.append(observer)
        return observer

    def notify(self, arg: T) -> None:
        """Call every observer; one that raises does not stop the others, and
        the first exception is raised once all were called."""
        error: BaseException | None = None
        for observer in tuple(self):
            try:
                observer(arg)
            except BaseException as exc:     # noqa: BLE001 - re-raised below
                error = error or exc
        if error is not None:
            raise error
