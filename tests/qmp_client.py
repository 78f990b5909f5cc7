"""A small blocking QMP client on a bare UNIX socket, for the VMM tests.

Replies and events are told apart as QMP does (an ``event`` member); events
are kept in ``events`` in the order they came.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

TIMEOUT = 30


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def strict_loads(line: bytes) -> Any:
    """RFC 8259 JSON only: no NaN, Infinity or -Infinity tokens."""
    return json.loads(line, parse_constant=_no_constant)


class RawQmpClient:
    """A QMP client on a bare socket, for input no library would send; it
    accepts only strict JSON from the server."""

    def __init__(self, path: Path | str, negotiate: bool = True, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self.read()
        if negotiate:
            assert self.ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}

    def read(self) -> dict[str, Any]:
        """The next message that is not an event (events go to ``events``)."""
        while True:
            line = self.reader.readline()
            assert line.endswith(b"\r\n"), line
            message: dict[str, Any] = strict_loads(line)
            if "event" not in message:
                return message
            self.events.append(message)

    def ask(self, data: bytes) -> dict[str, Any]:
        self.sock.sendall(data)
        return self.read()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class QmpClient:
    def __init__(self, path: Path | str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.reader = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self._message()
        assert "QMP" in self.greeting, self.greeting
        assert self.execute("qmp_capabilities") == {}

    def _message(self) -> dict[str, Any]:
        line = self.reader.readline()
        assert line.endswith(b"\r\n"), f"connection closed or cut: {line!r}"
        message: dict[str, Any] = json.loads(line)
        return message

    def _reply(self) -> dict[str, Any]:
        while True:
            message = self._message()
            if "event" not in message:
                return message
            self.events.append(message)

    def ask(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Send one command; its whole reply (``return`` or ``error``)."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self.sock.sendall(json.dumps(request).encode())
        return self._reply()

    def execute(self, command: str, **arguments: Any) -> Any:
        """Send one command; its ``return`` value (an error fails the test)."""
        reply = self.ask(command, **arguments)
        assert "return" in reply, reply
        return reply["return"]

    def wait_event(self, name: str) -> dict[str, Any]:
        """The first event called ``name`` not yet waited for (read as needed)."""
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            self.events.append(self._message())

    def until(self, name: str) -> list[str]:
        """The names of the events up to the first ``name`` (read as needed),
        taken out of ``events``."""
        while not any(e["event"] == name for e in self.events):
            self.events.append(self._message())
        end = next(i for i, e in enumerate(self.events) if e["event"] == name) + 1
        taken, self.events[:end] = self.events[:end], []
        return [e["event"] for e in taken]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
