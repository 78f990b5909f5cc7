"""Who owns a QMP socket path: a lock file beside the socket decides.

A server takes ``PATH.lock`` with ``flock(LOCK_EX | LOCK_NB)`` before it
touches ``PATH`` and holds it while it serves. A process that cannot take
the lock is refused: the socket belongs to a live server, however busy
(probing it with ``connect`` alone cannot tell a dead server from one whose
listen backlog is full, and unlinking the socket of a live one takes its
clients away). With the lock, a socket file left at ``PATH`` is stale and
replaced, as QEMU does, unless something that does not take the lock (a
QEMU, say) still listens on it. On release the socket, then the lock file,
is removed; a taker checks that the file it locked is still the one at the
path, so a lock file removed in between is never shared by two servers.
The socket appears at ``PATH`` only once it listens (``listen_unix``).
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat

SOCKET_MODE = 0o600
UNIX_PATH_MAX = 107
BACKLOG = 128                  # pending connections the kernel queues (capped by somaxconn)


class QmpServerError(ValueError):
    """The server cannot listen where it was asked to."""


class SocketOwner:
    """The lock, the listening socket and their removal, for one path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock_path = path + ".lock"
        self._lock_fd: int | None = None
        self._inode: tuple[int, int] | None = None

    def bind(self) -> socket.socket:
        """Take the lock, replace a stale socket, listen (mode 0600)."""
        path = self.path
        if not path or len(os.fsencode(path)) > UNIX_PATH_MAX:
            raise QmpServerError(f"QMP socket path {path!r} must have 1 to {UNIX_PATH_MAX} bytes")
        self._lock()
        try:
            sock, self._inode = listen_unix(path, BACKLOG)
            return sock
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Remove the socket if it is still ours, then the lock file."""
        if self._inode is not None:
            unlink_if(self.path, self._inode)
            self._inode = None
        if self._lock_fd is not None:
            st = os.fstat(self._lock_fd)
            unlink_if(self.lock_path, (st.st_dev, st.st_ino))
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             SOCKET_MODE)
            except OSError as exc:
                raise QmpServerError(f"cannot open the lock file {self.lock_path}: "
                                     f"{exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise QmpServerError(f"{self.path}: another process is serving on this socket "
                                     f"(it holds {self.lock_path})") from None
            except OSError as exc:
                os.close(fd)
                raise QmpServerError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
            st = os.fstat(fd)
            try:
                now = os.stat(self.lock_path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                self._lock_fd = fd
                return
            os.close(fd)          # its owner removed it as we locked it: take the new one

def listen_unix(path: str, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """A socket listening at ``path`` (mode 0600, non-blocking) and the
    inode of its file. A socket file at ``path`` that nobody listens on is
    replaced, as QEMU does; any other file, or a live listener, is refused
    (QmpServerError) and left alone.

    The socket is bound under a side name and renamed to ``path`` only once it
    listens: a client that waits for the path to appear, then connects (as
    scripts and tests do), is never refused by a socket that is bound but not
    yet listening. The caller keeps others off ``path`` (a lock, a private
    directory), which makes ``PATH~`` its own too."""
    _clear_stale(path)
    side = _side_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        # On Linux the socket file takes the socket inode's mode, so the
        # file is never reachable by others, not even between bind and chmod.
        os.fchmod(sock.fileno(), SOCKET_MODE)
        sock.bind(side)
        bound = True
        os.chmod(side, SOCKET_MODE)
        st = os.stat(side)
        sock.listen(backlog)
        sock.setblocking(False)
        if side != path:
            os.rename(side, path)
    except BaseException:
        if bound and side != path:
            try:
                os.unlink(side)
            except FileNotFoundError:
                pass
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise QmpServerError(f"{path} exists and is not a socket; not replacing it")
    if _is_listening(path):
        raise QmpServerError(f"{path}: another process is serving on this socket")
    os.unlink(path)       # left over from a process that is gone, as QEMU does


def _side_path(path: str) -> str:
    """``PATH~`` to bind before the rename; a socket left there by a process
    that died is removed. Where it does not fit a socket address, or some
    other file (or a live listener) is there, ``path`` itself is bound:
    listening then follows binding at once."""
    side = path + "~"
    if len(os.fsencode(side)) > UNIX_PATH_MAX:
        return path
    try:
        st = os.lstat(side)
    except FileNotFoundError:
        return side
    if not stat.S_ISSOCK(st.st_mode) or _is_listening(side):
        return path
    os.unlink(side)
    return side


def _is_listening(path: str) -> bool:
    """Whether something listens on the socket at ``path``. Only a refused
    connection (or no file) says no: a full backlog (EAGAIN) is a live
    listener, and so, to be safe, is any other error."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        probe.close()


def unlink_if(path: str, inode: tuple[int, int]) -> None:
    """Remove ``path`` if it is still the file ``inode`` names."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
