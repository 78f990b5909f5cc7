"""The QMP socket path appears only once it listens (``SocketOwner``).

A client that waits for the path to exist and then connects, as scripts and
the migration tests do, must never be refused by a socket that is bound but
not yet listening. Pure socket logic: no KVM.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from kvmmem.vmm.qmp_socket import UNIX_PATH_MAX, SocketOwner


def _probe(path: Path) -> str:
    """What a client that connects to ``path`` right now gets."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(path))
        return "connected"
    except FileNotFoundError:
        return "absent"
    except ConnectionRefusedError:
        return "refused"
    finally:
        client.close()


def test_the_path_is_never_there_and_refusing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "qmp.sock"
    seen: list[str] = []
    real_chmod, real_stat = os.chmod, os.stat

    def chmod(target, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_probe(path))        # between bind and listen
        return real_chmod(target, *args, **kwargs)

    def stat_(target, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(_probe(path))
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "stat", stat_)
    owner = SocketOwner(str(path))
    listener = owner.bind()
    monkeypatch.undo()
    try:
        assert seen and "refused" not in seen, seen
        assert _probe(path) == "connected"
        assert not Path(str(path) + "~").exists()
        assert (os.stat(path).st_mode & 0o777) == 0o600
    finally:
        listener.close()
        owner.release()
    assert not path.exists() and not Path(str(path) + ".lock").exists()


def test_a_side_socket_left_by_a_dead_server_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path) + "~")
    dead.close()
    owner = SocketOwner(str(path))
    listener = owner.bind()
    try:
        assert _probe(path) == "connected"
        assert not Path(str(path) + "~").exists()
    finally:
        listener.close()
        owner.release()


def test_a_file_at_the_side_name_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    side = Path(str(path) + "~")
    side.write_text("the user's")
    owner = SocketOwner(str(path))
    listener = owner.bind()
    try:
        assert _probe(path) == "connected"
        assert side.read_text() == "the user's"
    finally:
        listener.close()
        owner.release()


def test_a_path_of_the_longest_length_still_serves(tmp_path: Path) -> None:
    base = str(tmp_path) + "/"
    path = base + "q" * (UNIX_PATH_MAX - len(os.fsencode(base)))
    if len(os.fsencode(path)) != UNIX_PATH_MAX:
        pytest.fail(f"the temporary directory {base} is too long for this test")
    owner = SocketOwner(path)
    listener = owner.bind()
    try:
        assert _probe(Path(path)) == "connected"
    finally:
        listener.close()
        owner.release()
