"""A misbehaving vhost-user back-end for the hardening tests: a real
qemu-storage-daemon behind a proxy that forwards every message both ways
and adds exactly one fault.

kvmmem connects to :attr:`FaultProxy.path`; the proxy connects to the
daemon and relays each front-end message (with its SCM_RIGHTS file
descriptors) and each reply. A :class:`Fault` says what to change:

- ``refuse(request, payload)``: answer a REPLY_ACK of 1 (failure) instead of
  forwarding the request (only requests that asked for an acknowledgement);
- ``reply(request, payload)``: new bytes for the payload of a reply, its
  header's size field saying ``len(new)`` (or ``size`` when given);
- ``drip``: requests whose reply is sent one byte every ``drip_delay`` seconds.

Everything else the real daemon does itself: it maps the memory, runs the
rings and does the I/O.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmmem.vhost.messages import FLAG_NEED_REPLY, FLAG_REPLY, HEADER, VERSION, Request


@dataclass
class Fault:
    refuse: Callable[[Request, bytes], bool] = lambda req, payload: False
    reply: Callable[[Request, bytes], bytes | None] = lambda req, payload: None
    size: Callable[[Request, int], int] | None = None
    drip: frozenset[Request] = frozenset()
    drip_delay: float = 2.0
    seen: list[str] = field(default_factory=list)
    """Names of the requests the fault changed, in order."""


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError
        data += chunk
    return data


class FaultProxy:
    """Listens at ``directory/proxy.sock``; one front-end connection at a time."""

    def __init__(self, directory: Path, upstream: str, fault: Fault) -> None:
        self.path = str(directory / "proxy.sock")
        self.upstream = upstream
        self.fault = fault
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        accept = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        accept.start()

    def _accept(self) -> None:
        while True:
            try:
                front, _ = self._listener.accept()
            except OSError:
                return
            back = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            back.connect(self.upstream)
            self._socks += [front, back]
            for target in (self._front_to_back, self._back_to_front):
                t = threading.Thread(target=target, args=(front, back), daemon=True)
                t.start()
                self._threads.append(t)

    def _front_to_back(self, front: socket.socket, back: socket.socket) -> None:
        try:
            while True:
                header, fds, _, _ = socket.recv_fds(front, HEADER.size, 32)
                if not header:
                    break
                header += _recv_exact(front, HEADER.size - len(header))
                request, flags, size = HEADER.unpack(header)
                payload = _recv_exact(front, size)
                req = Request(request)
                if flags & FLAG_NEED_REPLY and self.fault.refuse(req, payload):
                    self.fault.seen.append(req.name)
                    for fd in fds:
                        os.close(fd)
                    front.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, 8)
                                  + struct.pack("<Q", 1))
                    continue
                socket.send_fds(back, [header + payload], fds) if fds else back.sendall(header + payload)
                for fd in fds:
                    os.close(fd)
        except (OSError, ValueError):
            pass
        finally:
            back.close()

    def _back_to_front(self, front: socket.socket, back: socket.socket) -> None:
        try:
            while True:
                header = _recv_exact(back, HEADER.size)
                request, flags, size = HEADER.unpack(header)
                payload = _recv_exact(back, size)
                req = Request(request)
                new = self.fault.reply(req, payload)
                if new is not None:
                    self.fault.seen.append(req.name)
                    payload = new
                    size = len(new) if self.fault.size is None else self.fault.size(req, len(new))
                data = HEADER.pack(request, flags, size) + payload
                if req in self.fault.drip:
                    self.fault.seen.append(req.name)
                    for i in range(len(data)):
                        front.sendall(data[i:i + 1])
                        time.sleep(self.fault.drip_delay)
                else:
                    front.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            front.close()

    def close(self) -> None:
        self._listener.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
