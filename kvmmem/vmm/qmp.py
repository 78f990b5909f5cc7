"""A QMP server on a UNIX socket (``-qmp unix:PATH,server=on[,wait=off]``).

The wire protocol is QEMU's (docs/interop/qmp-spec.rst): a greeting, then
capabilities negotiation, then commands and asynchronous events as JSON
objects, one per line. One background thread serves every client with a
selector; commands run in that thread (see
:mod:`kvmmem.vmm.qmp_commands`). Events may be raised in any thread, the
vCPU thread above all: they are queued and the server thread is woken to
send them. Bad input from a client costs it an error reply, never the
machine or the other clients; the socket is created with mode 0600, so only
its owner can connect.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvmmem.vmm.qmp_commands import MachineMonitor, version_info
from kvmmem.vmm.qmp_limits import MAX_CLIENTS, MAX_OUTPUT, OUT_OF_FDS, SUSPEND_AT, RateLimitedLog, SpareFd, refuse
from kvmmem.vmm.qmp_protocol import (
    MAX_MESSAGE_SIZE,
    ErrorClass,
    JsonSplitter,
    QmpError,
    StreamError,
    encode_message,
    parse_json,
)
from kvmmem.vmm.qmp_socket import QmpServerError, SocketOwner

if TYPE_CHECKING:
    from kvmmem.vmm.machine import Machine

__all__ = ["QmpServer", "QmpServerError", "QmpError", "ErrorClass", "MAX_MESSAGE_SIZE"]

log = logging.getLogger(__name__)

MAX_QUEUED_EVENTS = 65536      # events waiting for the server thread; oldest dropped
POLL_INTERVAL = 0.05           # seconds; how soon the server notices close()


@dataclass(eq=False)
class _Session:
    sock: socket.socket
    splitter: JsonSplitter
    out: bytearray = field(default_factory=bytearray)
    frames: collections.deque[bytes | StreamError] = field(default_factory=collections.deque)
    """Messages read but not answered yet: the client's replies wait unread."""
    negotiated: bool = False
    closed: bool = False
    events: int = selectors.EVENT_READ


def _error(desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> dict[str, Any]:
    return {"error": {"class": str(error_class), "desc": desc}}


class QmpServer:
    """Serves QMP for ``machine`` on the UNIX socket ``path``."""

    def __init__(self, machine: Machine, path: str | os.PathLike[str],
                 max_message_size: int = MAX_MESSAGE_SIZE,
                 max_clients: int = MAX_CLIENTS, max_output: int = MAX_OUTPUT) -> None:
        if max_message_size < 1024:
            raise QmpServerError(f"max_message_size {max_message_size} is below 1024 bytes; "
                                 "QMP commands would not fit")
        if max_clients < 1:
            raise QmpServerError(f"max_clients {max_clients} must be at least 1")
        self.max_clients = max_clients
        self.max_output = max_output
        self.held = 0
        """Bytes of replies and events waiting for clients to read them."""
        self._log = RateLimitedLog(log)
        self._spare: SpareFd | None = None
        self.machine = machine
        self.path = os.fspath(path)
        self.max_message_size = max_message_size
        self.monitor = MachineMonitor(machine, self._emit)
        self._events: collections.deque[bytes] = collections.deque(maxlen=MAX_QUEUED_EVENTS)
        self._sessions: list[_Session] = []
        self._thread: threading.Thread | None = None
        self._listener: socket.socket | None = None
        self._owner = SocketOwner(self.path)
        self._wake_lock = threading.Lock()
        self._wake_r = self._wake_w = -1
        self._stopping = threading.Event()
        self._dropped = 0
        self._first_client = threading.Event()

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        """Listen on the socket (mode 0600) and serve in a background thread."""
        if self._thread is not None:
            raise RuntimeError(f"the QMP server on {self.path} is already started")
        self._listener = self._owner.bind()
        self._spare = SpareFd()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.monitor.attach()
        self._thread = threading.Thread(target=self._serve, name=f"qmp:{self.path}", daemon=True)
        self._thread.start()

    def wait_for_client(self, give_up: Callable[[], bool]) -> bool:
        """Block until a client has connected and been greeted (``wait=on``:
        QEMU's tcp_chr_wait_connected()); False if ``give_up()`` became true first."""
        while not self._first_client.wait(POLL_INTERVAL):
            if give_up():
                return False
        return True

    def notify_shutdown(self, guest: bool = True, reason: str = "guest-shutdown") -> None:
        """Tell clients the machine stopped (SHUTDOWN); once per machine."""
        self.monitor.notify_shutdown(guest, reason)

    def close(self) -> None:
        """Send what is pending (a SHUTDOWN if none was sent), disconnect
        every client, stop the thread and remove the socket."""
        if self._thread is None:
            return
        self.monitor.notify_shutdown()
        self._stopping.set()
        self._wake()
        self._thread.join(10)
        if self._thread.is_alive():
            log.error("QMP server thread on %s did not stop", self.path)
        self.monitor.detach()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = -1
        self._thread = None
        self._owner.release()

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- events (any thread) ---------------------------------------------------

    def _emit(self, event: str, data: dict[str, Any] | None) -> None:
        now = time.time()
        message: dict[str, Any] = {"timestamp": {"seconds": int(now),
                                                 "microseconds": int(now % 1 * 1_000_000)},
                                   "event": event}
        if data is not None:
            message["data"] = data
        if len(self._events) == self._events.maxlen:
            self._dropped += 1        # deque drops the oldest; counted, logged by the server
        self._events.append(encode_message(message))
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w >= 0:
                try:
                    os.write(self._wake_w, b"\0")
                except BlockingIOError:
                    pass          # already awake: the pipe is full of wake-ups

    # -- the server thread ------------------------------------------------------

    def _serve(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                for key, mask in sel.select(POLL_INTERVAL):
                    try:
                        self._ready(sel, key.data, mask)
                    except Exception:          # a bug must not take the monitor down
                        log.exception("QMP: error while serving %s", key.data)
                        if isinstance(key.data, _Session):
                            self._drop(sel, key.data)
                self._tick(sel)
            self._tick(sel)
            self._flush_before_exit()
        finally:
            for session in list(self._sessions):
                self._drop(sel, session)
            sel.close()
            self._listener.close()
            if self._spare is not None:
                self._spare.close()

    def _ready(self, sel: selectors.BaseSelector, what: object, mask: int) -> None:
        if what == "listen":
            self._accept(sel)
        elif what == "wake":
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        elif isinstance(what, _Session) and not what.closed:
            if mask & selectors.EVENT_READ:
                self._receive(sel, what)
            if mask & selectors.EVENT_WRITE and not what.closed:
                self._write(sel, what)
                self._work(sel, what)

    def _tick(self, sel: selectors.BaseSelector) -> None:
        if self._dropped:
            log.warning("QMP: %d events dropped (more than %d were waiting)", self._dropped,
                        MAX_QUEUED_EVENTS)
            self._dropped = 0
        while self._events:
            event = self._events.popleft()
            for session in list(self._sessions):
                if session.negotiated:
                    self._send(sel, session, event)

    def _accept(self, sel: selectors.BaseSelector) -> None:
        """Take every pending connection, so a burst of clients does not
        overflow the listen backlog while the server handles one per wake-up.
        Past ``max_clients``, or out of file descriptors, a client is
        accepted and refused at once: the backlog empties and the listening
        socket does not stay readable, which would spin this loop."""
        assert self._listener is not None and self._spare is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_FDS:
                    self._log.warning("QMP: cannot accept a client: %s", exc)
                    if exc.errno == errno.ECONNABORTED:
                        continue           # that client is gone; the next one may be there
                    return
                if not self._refuse_without_fds(exc):
                    return
                continue
            if len(self._sessions) >= self.max_clients:
                self._log.warning("QMP: refusing a client: %d clients are connected, the limit",
                                  len(self._sessions))
                refuse(sock, f"too many QMP clients (the limit is {self.max_clients}); "
                             "try again later")
                continue
            self._greet(sel, sock)

    def _refuse_without_fds(self, exc: OSError) -> bool:
        """Out of file descriptors: use the spare one to accept the client
        and refuse it. Whether one was taken from the backlog."""
        assert self._listener is not None and self._spare is not None
        self._log.warning("QMP: refusing a client: %s", exc.strerror)
        if self._spare.release():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                pass
            else:
                refuse(sock, "the QMP server has no file descriptor left for another client; "
                             "try again later")
                self._spare.take()
                return True
        self._spare.take()
        time.sleep(POLL_INTERVAL)      # no spare: the client stays queued; do not spin on it
        return False

    def _greet(self, sel: selectors.BaseSelector, sock: socket.socket) -> None:
        sock.setblocking(False)
        session = _Session(sock, JsonSplitter(self.max_message_size))
        self._sessions.append(session)
        sel.register(sock, selectors.EVENT_READ, session)
        greeting = {"QMP": {"version": version_info(), "capabilities": []}}
        self._send(sel, session, encode_message(greeting))
        self._first_client.set()

    def _receive(self, sel: selectors.BaseSelector, session: _Session) -> None:
        try:
            data = session.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("QMP: client read failed: %s", exc)
            data = b""
        if not data:              # gone, maybe in the middle of a message: forget it
            self._drop(sel, session)
            return
        session.frames.extend(session.splitter.feed(data))
        self._work(sel, session)

    def _work(self, sel: selectors.BaseSelector, session: _Session) -> None:
        """Answer the client's messages while it reads its replies. One that
        leaves SUSPEND_AT bytes unread is not answered nor read from until it
        reads them (QEMU's monitor suspends a client the same way), so what
        it sends waits in its own socket, not in this process."""
        while session.frames and not session.closed and len(session.out) < SUSPEND_AT:
            reply = self._handle(session, session.frames.popleft())
            self._send(sel, session, encode_message(reply))
        if not session.closed:
            self._interest(sel, session)

    def _send(self, sel: selectors.BaseSelector, session: _Session, data: bytes) -> None:
        if session.closed:
            return
        session.out += data
        self.held += len(data)
        self._write(sel, session)
        if self.held > self.max_output:
            self._shed(sel)
        if not session.closed:
            self._interest(sel, session)

    def _shed(self, sel: selectors.BaseSelector) -> None:
        """All clients together hold more than ``max_output`` unread bytes:
        drop the ones holding most (each above its fair share) until they fit."""
        while self.held > self.max_output and self._sessions:
            victim = max(self._sessions, key=lambda s: len(s.out))
            self._log.warning("QMP: a client left %d bytes unread (clients may hold %d in "
                              "all); disconnecting it", len(victim.out), self.max_output)
            self._drop(sel, victim)

    def _write(self, sel: selectors.BaseSelector, session: _Session) -> None:
        """Send what the client's socket takes now."""
        while session.out:
            try:
                sent = session.sock.send(session.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("QMP: client write failed: %s", exc)
                self._drop(sel, session)
                return
            del session.out[:sent]
            self.held -= sent

    def _interest(self, sel: selectors.BaseSelector, session: _Session) -> None:
        """Read while the client is not suspended; write while output waits."""
        suspended = bool(session.frames) or len(session.out) >= SUSPEND_AT
        wanted = (0 if suspended else selectors.EVENT_READ) | \
            (selectors.EVENT_WRITE if session.out else 0)
        wanted = wanted or selectors.EVENT_READ         # (never 0: suspended implies output)
        if wanted != session.events:
            sel.modify(session.sock, wanted, session)
            session.events = wanted

    def _drop(self, sel: selectors.BaseSelector, session: _Session) -> None:
        if session.closed:
            return
        session.closed = True
        self.held -= len(session.out)
        session.out.clear()
        session.frames.clear()
        self._sessions.remove(session)
        try:
            sel.unregister(session.sock)
        except (KeyError, ValueError):
            pass
        session.sock.close()

    def _flush_before_exit(self, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        for session in self._sessions:
            remaining = deadline - time.monotonic()
            if not session.out or remaining <= 0:
                continue
            try:
                session.sock.settimeout(remaining)
                session.sock.sendall(session.out, socket.MSG_NOSIGNAL)
            except OSError:
                pass

    # -- one message ----------------------------------------------------------

    def _handle(self, session: _Session, frame: bytes | StreamError) -> dict[str, Any]:
        """The reply to one message, with its ``id`` when it has one."""
        if isinstance(frame, StreamError):
            return _error(frame.desc)
        try:
            request = parse_json(frame)
        except ValueError as exc:
            return _error(f"JSON parse error, {exc}")
        if not isinstance(request, dict):
            return _error("QMP input must be a JSON object")
        reply = self._dispatch(session, request)
        if "id" in request:
            reply["id"] = request["id"]
        return reply

    def _dispatch(self, session: _Session, request: dict[str, Any]) -> dict[str, Any]:
        for key, value in request.items():
            if key == "execute" and not isinstance(value, str):
                return _error("QMP input member 'execute' must be a string")
            if key == "arguments" and not isinstance(value, dict):
                return _error("QMP input member 'arguments' must be an object")
            if key not in ("execute", "arguments", "id"):
                return _error(f"QMP input member '{key}' is unexpected")
        if "execute" not in request:
            return _error("QMP input lacks member 'execute'")
        name, args = request["execute"], request.get("arguments", {})
        if not session.negotiated and name != "qmp_capabilities":
            return _error("Expecting capabilities negotiation with 'qmp_capabilities'",
                          ErrorClass.COMMAND_NOT_FOUND)
        if session.negotiated and name == "qmp_capabilities":
            return _error("Capabilities negotiation is already complete, command ignored",
                          ErrorClass.COMMAND_NOT_FOUND)
        try:
            result = self.monitor.execute(name, args)
        except QmpError as exc:
            return _error(exc.desc, exc.error_class)
        except Exception as exc:               # noqa: BLE001 - reported to the client
            log.exception("QMP: %s failed", name)
            return _error(f"{name} failed: {exc}")
        if name == "qmp_capabilities":
            session.negotiated = True
        return {"return": result}
