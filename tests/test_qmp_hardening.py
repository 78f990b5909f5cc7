"""The QMP server under hostile clients: strict JSON both ways, bounded
clients and memory, a socket nobody can take over.

Each test serves a real Machine (the test guest loaded under KVM, not
running unless said) over a real UNIX socket, in-process, or runs
``kvmmem run`` as a subprocess where the whole process is measured.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 30


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def strict_loads(line: bytes) -> Any:
    """RFC 8259 JSON only: no NaN, Infinity or -Infinity tokens."""
    return json.loads(line, parse_constant=_no_constant)


class Client:
    """A QMP client on a bare socket that accepts only strict JSON."""

    def __init__(self, path: Path, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
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
            message = strict_loads(line)
            if "event" not in message:
                return message
            self.events.append(message)

    def ask(self, data: bytes) -> dict[str, Any]:
        self.sock.sendall(data)
        return self.read()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def machine(guest_elf: Path) -> Iterator[Any]:
    """A Machine with the test guest loaded (not running)."""
    from kvmmem.vmm.machine import Machine, MachineConfig

    m = Machine(MachineConfig(ram_size=64 * MiB, kernel=str(guest_elf)))
    yield m
    m.close()


@pytest.fixture
def served(machine: Any, tmp_path: Path) -> Iterator[Any]:
    """A started QmpServer for ``machine`` on tmp_path/qmp.sock."""
    from kvmmem.vmm.qmp import QmpServer

    server = QmpServer(machine, tmp_path / "qmp.sock")
    server.start()
    yield server
    server.close()


# -- strict JSON (issue 13, point 10) ---------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("message", [
    b'{"execute": "query-status", "id": 1e400}',
    b'{"execute": "query-status", "id": -1e400}',
    b'{"execute": "qom-get", "arguments": {"path": "/", "property": "type", "x": [2e308]}}',
])
def test_non_finite_numbers_are_refused_and_replies_stay_strict_json(served: Any,
                                                                      message: bytes) -> None:
    client = Client(Path(served.path))
    reply = client.ask(message)            # strict_loads: a bare Infinity would fail here
    assert set(reply) == {"error"}, reply  # not parsed, so no id to echo (as QEMU)
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("JSON parse error")
    assert "not a finite number" in reply["error"]["desc"]
    assert client.ask(b'{"execute": "query-status", "id": 1.5e300}') == {
        "return": {"status": "running", "running": True}, "id": 1.5e300}
    client.close()


def test_a_reply_that_cannot_be_strict_json_becomes_an_error() -> None:
    from kvmmem.vmm.qmp_protocol import encode_message

    for value in (float("inf"), float("nan"), [1, {"x": -float("inf")}]):
        line = encode_message({"return": value, "id": 7})
        assert line.endswith(b"\r\n")
        reply = strict_loads(line)
        assert reply["id"] == 7 and reply["error"]["class"] == "GenericError"
        assert "not valid JSON" in reply["error"]["desc"]
    assert encode_message({"return": {"a": 1.25}}) == b'{"return": {"a": 1.25}}\r\n'


# -- many clients at once (issue 13, point 12) ------------------------------------

def _connect_now(path: str) -> socket.socket:
    """A connect that does not wait: refused at once if the backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


@pytest.mark.kvm
def test_fifty_clients_connecting_at_once_are_all_served(served: Any) -> None:
    socks, refused = [], 0
    for _ in range(50):
        try:
            socks.append(_connect_now(served.path))
        except BlockingIOError:            # EAGAIN: the listen backlog was full
            refused += 1
    try:
        assert refused == 0
        for sock in socks:
            sock.settimeout(TIMEOUT)
            reader = sock.makefile("rb")
            assert "QMP" in strict_loads(reader.readline())
            sock.sendall(b'{"execute": "qmp_capabilities", "id": 1}')
            assert strict_loads(reader.readline()) == {"return": {}, "id": 1}
            reader.close()
    finally:
        for sock in socks:
            sock.close()
