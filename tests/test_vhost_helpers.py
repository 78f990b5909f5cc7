"""The helper that waits for qemu-storage-daemon's socket waits for listen(), not bind()."""

from __future__ import annotations

import socket
from pathlib import Path

from vhost_helpers import is_listening


def test_a_bound_socket_is_not_listening_until_listen(tmp_path: Path) -> None:
    path = str(tmp_path / "disk.sock")
    assert not is_listening(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)                   # the file exists, a connect is still refused
        assert Path(path).exists() and not is_listening(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            assert client.connect_ex(path) != 0
        server.listen(1)
        assert is_listening(path)
        assert not is_listening(path + ".other")
