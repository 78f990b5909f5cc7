"""The vhost-user front-end: one UNIX socket connection to a back-end.

QEMU's ``docs/interop/vhost-user.rst`` is the protocol; the order of the
set-up messages follows QEMU's ``vhost_user_backend_init`` and
``vhost_dev_init``: GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM
(with MQ), GET_MAX_MEM_SLOTS (with CONFIGURE_MEM_SLOTS), SET_OWNER. Every
request is written whole, with its file descriptors as ``SCM_RIGHTS``; a
request that has no reply of its own asks for an acknowledgement when the
back-end offered REPLY_ACK, so a refusal is seen at once.

Requests are counted by name in :attr:`VhostUserFrontend.sent` (what the
tests check). A watcher thread polls the socket for a hang-up, so a back-end
that dies is noticed at once and reported through ``on_disconnect``, not at
the next request; after that every request raises :class:`BackendGone`.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Self, TypeVar

from kvmmem.vhost.messages import (
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MEMORY_BASELINE_NREGIONS,
    VERSION,
    Header,
    ProtocolFeature,
    Request,
    VhostUserProtocolError,
    pack_u64,
    unpack_u64,
)

__all__ = ["SUPPORTED_PROTOCOL_FEATURES", "BackendGone", "VhostUserError", "VhostUserFrontend"]

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_REPLY = 64 * 1024
"""The largest reply payload accepted (the largest the protocol has, GET_CONFIG's, is 256 bytes)."""

SUPPORTED_PROTOCOL_FEATURES = (1 << ProtocolFeature.MQ | 1 << ProtocolFeature.REPLY_ACK
                               | 1 << ProtocolFeature.CONFIG
                               | 1 << ProtocolFeature.CONFIGURE_MEM_SLOTS)
"""What this front-end can use; the rest of what a back-end offers is not acknowledged."""

# Requests that carry a reply body of their own (no REPLY_ACK needed).
_HAS_REPLY = frozenset({Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES,
                        Request.GET_VRING_BASE, Request.GET_QUEUE_NUM, Request.GET_CONFIG,
                        Request.GET_MAX_MEM_SLOTS})


class VhostUserError(OSError):
    """The back-end refused a request, answered wrongly or is unusable.

    An OSError, like the other host-side failures: a memory device whose
    memslot a back-end refuses answers the guest BUSY and changes nothing."""


class BackendGone(VhostUserError):
    """The connection to the back-end is closed."""


class VhostUserFrontend:
    """A connected vhost-user back-end and what it offered.

    ``protocol_features_mask`` limits the protocol features this front-end
    acknowledges (tests clear CONFIGURE_MEM_SLOTS to get the SET_MEM_TABLE
    path). ``timeout`` bounds each reply wait; a back-end that does not
    answer in time is treated as gone.
    """

    def __init__(self, path: str, name: str = "vhost-user", *, timeout: float = 10.0,
                 protocol_features_mask: int = SUPPORTED_PROTOCOL_FEATURES) -> None:
        self.path = path
        self.name = name
        self.sent: Counter[str] = Counter()
        """Requests written to the back-end, by name (``ADD_MEM_REG``, ...)."""
        self.on_disconnect: list[Callable[[str], None]] = []
        """Called once, from the watcher thread or a failing request, with the reason."""
        self._lock = threading.Lock()
        self._gone: str | None = None
        self._connected = False     # until the handshake is done, a failure is only raised
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._timeout = timeout
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise VhostUserError(f"{name}: cannot connect to the vhost-user back-end at "
                                 f"{path!r}: {exc.strerror or exc}") from None
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self._handshake(protocol_features_mask)
        except BaseException:
            self._sock.close()
            os.close(self._wake)
            raise
        self._connected = True
        self._watcher = threading.Thread(target=self._watch, name=f"{name}-watch", daemon=True)
        self._watcher.start()

    # -- what the back-end offered -------------------------------------------

    def _handshake(self, mask: int) -> None:
        self.features = self.get_u64(Request.GET_FEATURES)
        """The back-end's virtio feature bits (with VHOST_USER_F_PROTOCOL_FEATURES)."""
        self.protocol_features = 0
        if self.features >> F_PROTOCOL_FEATURES & 1:
            offered = self.get_u64(Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = offered & mask
            self.request(Request.SET_PROTOCOL_FEATURES, pack_u64(self.protocol_features))
        self.queue_num = 1
        if self.has(ProtocolFeature.MQ):
            self.queue_num = self.get_u64(Request.GET_QUEUE_NUM)
        self.max_mem_slots = MEMORY_BASELINE_NREGIONS
        """GET_MAX_MEM_SLOTS, or 8 (the SET_MEM_TABLE limit) without CONFIGURE_MEM_SLOTS."""
        if self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            self.max_mem_slots = self.get_u64(Request.GET_MAX_MEM_SLOTS)
            if self.max_mem_slots == 0:
                raise VhostUserError(f"{self.name}: the back-end offers 0 memory slots")
        self.request(Request.SET_OWNER)

    def has(self, feature: ProtocolFeature) -> bool:
        """Whether a protocol feature was negotiated."""
        return bool(self.protocol_features >> feature & 1)

    @property
    def connected(self) -> bool:
        return self._gone is None

    @property
    def disconnect_reason(self) -> str | None:
        return self._gone

    # -- requests ------------------------------------------------------------

    def request(self, req: Request, payload: bytes = b"", fds: Sequence[int] = (),
                *, reply: bool | None = None) -> bytes | None:
        """Send ``req``; return the reply payload when it has one.

        ``reply`` defaults to whether the request has a reply body; requests
        without one ask for an acknowledgement when REPLY_ACK was negotiated
        and raise :class:`VhostUserError` if the back-end refuses. A reply
        that breaks the protocol (wrong request, wrong size, not complete
        within ``timeout`` seconds all told) is the end of the connection, as
        in QEMU's ``vhost_user_read``: the back-end is treated as gone and
        :class:`BackendGone` raised.
        """
        has_reply = req in _HAS_REPLY if reply is None else reply
        want_ack = not has_reply and self.has(ProtocolFeature.REPLY_ACK)
        flags = VERSION | (FLAG_NEED_REPLY if want_ack else 0)
        data = Header(int(req), flags, len(payload)).pack() + payload
        failure = None
        status = 0
        with self._lock:
            if self._gone is not None:
                raise BackendGone(f"{self.name}: the back-end is gone ({self._gone}); "
                                  f"{req.name} not sent")
            try:
                if fds:
                    socket.send_fds(self._sock, [data], list(fds))
                else:
                    self._sock.sendall(data)
                self.sent[req.name] += 1
                if not (has_reply or want_ack):
                    return None
                answer = self._read_reply(req)
                if want_ack:
                    status = unpack_u64(answer)
            except (OSError, VhostUserProtocolError) as exc:
                failure = f"{req.name} failed: {exc}"
                self._gone = failure
                self._hang_up()
        if failure is not None:
            self._report_gone(failure)      # outside the lock: callbacks take their own
            raise BackendGone(f"{self.name}: {failure}")
        if want_ack:
            if status != 0:
                raise VhostUserError(f"{self.name}: the back-end refused {req.name} "
                                     f"(status {status})")
            return None
        return answer

    def query(self, req: Request, decode: Callable[[bytes], T], payload: bytes = b"") -> T:
        """A request with a reply body, decoded by ``decode``; a reply that does not
        decode breaks the protocol like any other (BackendGone)."""
        answer = self.request(req, payload, reply=True)
        assert answer is not None
        try:
            return decode(answer)
        except VhostUserProtocolError as exc:
            raise self.fail(f"bad reply to {req.name}: {exc}") from None

    def get_u64(self, req: Request) -> int:
        return self.query(req, unpack_u64)

    def fail(self, reason: str) -> BackendGone:
        """Give up on the back-end (a protocol error, or it cannot follow a memory
        change): the connection is shut down and reported gone; returns the
        exception to raise."""
        with self._lock:
            first = self._gone is None
            if first:
                self._gone = reason
                self._hang_up()
        if first:
            self._report_gone(reason)
        return BackendGone(f"{self.name}: {reason}")

    def _hang_up(self) -> None:
        """Shut the socket down (the back-end sees the hang-up); with the lock held."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_reply(self, req: Request) -> bytes:
        deadline = time.monotonic() + self._timeout
        header = Header.unpack(self._recv_exact(HEADER.size, deadline))
        if header.request != req or not header.flags & FLAG_REPLY:
            raise VhostUserProtocolError(f"expected the reply to {req.name}, got request "
                                         f"{header.request} with flags {header.flags:#x}")
        if header.size > MAX_REPLY:
            raise VhostUserProtocolError(f"a reply of {header.size} bytes to {req.name}")
        return self._recv_exact(header.size, deadline)

    def _recv_exact(self, size: int, deadline: float) -> bytes:
        """``size`` bytes, all of them before ``deadline`` (a back-end that drips
        its reply byte by byte does not get a new timeout for every byte)."""
        chunks, left = [], size
        while left:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no complete reply within {self._timeout:g} s")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(left)
            if not chunk:
                raise ConnectionResetError("the back-end closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    # -- disconnection -------------------------------------------------------

    def _watch(self) -> None:
        """Wait for the back-end to hang up (or for close())."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLRDHUP)
        poller.register(self._wake, select.POLLIN)
        while self._gone is None:
            events = poller.poll()
            if any(fd == self._wake for fd, _ in events):
                return
            if any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in events):
                reason = "the back-end closed the connection"
                with self._lock:
                    if self._gone is not None:
                        return
                    self._gone = reason
                self._report_gone(reason)
                return

    def _report_gone(self, reason: str) -> None:
        """Log the disconnection and tell the listeners (called once, without the lock).
        A handshake that fails is not logged: the caller reports its exception, in one line."""
        if not self._connected:
            return
        log.error("%s: vhost-user back-end at %s disconnected: %s", self.name, self.path, reason)
        for callback in list(self.on_disconnect):
            try:
                callback(reason)
            except Exception:
                log.exception("%s: disconnect callback failed", self.name)

    def close(self) -> None:
        """Close the connection (the back-end sees a hang-up); idempotent."""
        if self._sock.fileno() < 0:
            return
        with self._lock:
            if self._gone is None:
                self._gone = "closed by the front-end"
        os.eventfd_write(self._wake, 1)
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join()
        self._sock.close()
        os.close(self._wake)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "connected" if self._gone is None else f"gone ({self._gone})"
        return f"<VhostUserFrontend {self.name!r} {self.path!r} {state}>"
