"""The QMP server under hostile clients: strict JSON both ways, bounded
clients and memory, a socket nobody can take over.

Each test serves a real Machine (the test guest loaded under KVM, not
running unless said) over a real UNIX socket, in-process, or runs
``kvmmem run`` as a subprocess where the whole process is measured.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qmp_client import RawQmpClient as Client
from qmp_client import strict_loads

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 30
ROOT = Path(__file__).resolve().parents[1]






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

    for value in (float("inf"), float("nan"), [1, {"x": -float("inf")}], {1, 2}, b"raw"):
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


class Vmm:
    """``kvmmem run`` with the test guest (idle once it reached its
    requested size) and a QMP socket, as a subprocess; stderr to a file."""

    def __init__(self, guest: Path, tmp: Path, *extra: str) -> None:
        self.sock = tmp / "qmp.sock"
        self.stderr_path = tmp / "vmm.stderr"
        self._stderr = open(self.stderr_path, "wb")     # noqa: SIM115 - the child's, for its life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvmmem", "run", "-m", "512M,maxmem=8704M",
             "-object", "memory-backend-ram,id=mem0,size=4G",
             "-device", "virtio-mem,id=vmem0,memdev=mem0,requested-size=128M",
             "-kernel", str(guest), "-serial", "none", *extra,
             "-qmp", f"unix:{self.sock},server=on,wait=off"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.monotonic() + TIMEOUT
        while not self.sock.exists():          # waiting for start-up, not measuring it
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "the VMM did not create its QMP socket"
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status(self, key: str) -> int:
        """A ``VmRSS``-like line of /proc/PID/status, in kB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def quit(self) -> int:
        """``quit`` over QMP; the VMM's exit status."""
        client = Client(self.sock)
        assert client.ask(b'{"execute": "quit"}') == {"return": {}}
        client.close()
        return self.wait()

    def wait(self) -> int:
        status = self.proc.wait(TIMEOUT)
        self._stderr.close()
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(TIMEOUT)
        self._stderr.close()


@pytest.fixture
def vmm_factory(guest_elf: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Vmm] = []

    def start(*extra: str) -> Vmm:
        started.append(Vmm(guest_elf, tmp_path, *extra))
        return started[-1]

    yield start
    for vmm in started:
        vmm.kill()


# -- a bounded number of clients (issue 13, point 2) ------------------------------

def _first_line(sock: socket.socket) -> tuple[dict[str, Any] | None, bytes]:
    """The first message on a fresh connection, and what follows it until EOF
    (or b"..." when the server keeps the connection open)."""
    sock.settimeout(TIMEOUT)
    reader = sock.makefile("rb")
    first = reader.readline()
    message = strict_loads(first) if first else None
    if message is not None and "QMP" in message:
        rest = b"..."                        # greeted: the connection stays open
    else:
        rest = reader.read()                 # refused: the server closes it
    reader.close()
    return message, rest


@pytest.mark.kvm
def test_clients_beyond_the_limit_are_refused_and_the_others_served(machine: Any,
                                                                    tmp_path: Path) -> None:
    from kvmmem.vmm.qmp import QmpServer

    with QmpServer(machine, tmp_path / "qmp.sock", max_clients=3) as server:
        clients = [Client(Path(server.path)) for _ in range(3)]
        for _ in range(5):
            extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.connect(server.path)
            message, rest = _first_line(extra)
            extra.close()
            assert message is not None and rest == b""
            assert message["error"]["desc"] == "too many QMP clients (the limit is 3); " \
                                               "try again later"
        for client in clients:
            assert client.ask(b'{"execute": "query-status"}')["return"]["status"] == "running"
        clients.pop().close()
        clients.append(Client(Path(server.path)))        # a place is free again
        assert clients[-1].ask(b'{"execute": "query-version"}')["return"]["package"]
        for client in clients:
            client.close()


@pytest.mark.kvm
def test_out_of_file_descriptors_clients_are_refused_and_the_vmm_carries_on(vmm_factory: Any) -> None:
    vmm = vmm_factory()
    limit = vmm.fds() + 4           # room for 4 clients, and none for the spare afterwards
    resource.prlimit(vmm.pid, resource.RLIMIT_NOFILE, (limit, limit))
    socks = [_connect_now(str(vmm.sock)) for _ in range(40)]
    answers = [_first_line(sock) for sock in socks]
    greeted = [s for s, (m, _) in zip(socks, answers) if m is not None and "QMP" in m]
    refused = [(m, rest) for m, rest in answers if m is None or "error" in m]
    assert len(greeted) + len(refused) == 40 and 0 < len(greeted) <= 4
    assert all(rest == b"" for _, rest in refused)                   # closed, not left hanging
    assert any(m is not None and "no file descriptor left" in m["error"]["desc"]
               for m, _ in refused)
    for sock in greeted:
        sock.close()
    for _ in range(100):        # "try again later": until the server has seen those go
        sock = _connect_now(str(vmm.sock))
        message, _ = _first_line(sock)
        sock.close()
        if message is not None and "QMP" in message:
            break
        time.sleep(0.05)
    client = Client(vmm.sock)                                         # works at the limit
    assert client.ask(b'{"execute": "query-status"}')["return"]["status"] == "running"
    client.close()
    assert vmm.quit() == 0
    lines = [line for line in vmm.stderr().splitlines() if "QMP" in line]
    assert 1 <= len(lines) <= len(refused) // 4, lines               # rate-limited


# -- clients that never read (issue 13, point 7) ----------------------------------

def _flood(sock: socket.socket, chunk: bytes, sent: int, budget: int) -> int:
    """Send copies of ``chunk`` back to back without blocking, carrying on
    from ``sent`` bytes already sent, until the socket takes no more or
    ``budget`` more bytes went; the new total (-1 once the server dropped it)."""
    stop = sent + budget
    while sent < stop:
        offset = sent % len(chunk)
        try:
            n = sock.send(chunk[offset:], socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return sent
        except OSError:
            return -1
        sent += n
    return sent


@pytest.mark.kvm
def test_forty_clients_that_never_read_leave_the_vmm_memory_flat(vmm_factory: Any) -> None:
    """Each of 40 clients sends commands whose replies (60 KB each: the
    echoed id) it never reads, as much as the VMM takes. The VMM's peak
    RSS must stay flat: it stops answering a client with 64 KiB unread and
    holds at most 32 MiB for all of them."""
    vmm = vmm_factory()
    good = Client(vmm.sock)
    before = vmm.status("VmHWM")
    chunk = b"".join(b'{"execute": "query-status", "id": "%s"}' % (b"x" * 60_000)
                     for _ in range(4))
    floods = []
    for _ in range(40):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(vmm.sock))
        sock.sendall(b'{"execute": "qmp_capabilities"}')
        sock.setblocking(False)
        floods.append([sock, 0])
    idle_rounds = 0
    while idle_rounds < 3:
        progress = False
        for flood in floods:
            if flood[1] < 0 or flood[1] >= 24 * MiB:
                continue
            total = _flood(flood[0], chunk, flood[1], 256 * 1024)
            progress |= total != flood[1]
            flood[1] = total
        # a round trip: the server has had its turn at every socket since
        assert good.ask(b'{"execute": "query-status"}')["return"]["status"] == "running"
        idle_rounds = 0 if progress else idle_rounds + 1
    grown = vmm.status("VmHWM") - before
    assert grown < 96 * 1024, f"peak RSS grew by {grown} kB"     # 650 MB before the bound
    assert all(total > 0 for _, total in floods)       # each sent, none was dropped for it
    for sock, _ in floods:
        sock.close()
    assert good.ask(b'{"execute": "query-status"}')["return"]["running"]
    good.close()
    assert vmm.quit() == 0


@pytest.mark.kvm
def test_clients_that_leave_events_unread_are_dropped_and_readers_kept(machine: Any,
                                                                       tmp_path: Path) -> None:
    from kvmmem.vmm.qmp import QmpServer

    with QmpServer(machine, tmp_path / "qmp.sock", max_output=1 * MiB) as server:
        reader = Client(Path(server.path))
        sleepers = [Client(Path(server.path)) for _ in range(3)]
        payload = "e" * 1000
        for batch in range(40):                 # 40 x 100 events of ~1 KB: 4 MB per client
            for i in range(100):
                server.monitor.emit("X_TEST", {"n": batch * 100 + i, "pad": payload})
            while len(reader.events) < (batch + 1) * 100:
                message = strict_loads(reader.reader.readline())
                reader.events.append(message)
        assert [e["data"]["n"] for e in reader.events] == list(range(4000))
        assert reader.ask(b'{"execute": "query-status"}')["return"]["status"] == "running"
        for sleeper in sleepers:              # what they were sent, then EOF: dropped
            sleeper.sock.settimeout(TIMEOUT)
            assert sleeper.reader.read().count(b'"X_TEST"') < 4000
        assert server.held <= 1 * MiB
        reader.close()
        for sleeper in sleepers:
            sleeper.close()


# -- who owns the socket (issue 13, point 9) --------------------------------------

def _inode(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


@pytest.mark.kvm
def test_a_live_listener_with_a_full_backlog_keeps_its_socket(machine: Any, tmp_path: Path) -> None:
    """Something (not kvmmem: no lock file) listens on the path and does not
    accept: its backlog is full. A probe cannot connect, yet the socket is live."""
    from kvmmem.vmm.qmp import QmpServer, QmpServerError

    path = tmp_path / "busy.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    queued = []
    while True:
        try:
            queued.append(_connect_now(str(path)))
        except BlockingIOError:
            break                                   # the backlog is full
    inode = _inode(path)
    with pytest.raises(QmpServerError, match="another process is serving"):
        QmpServer(machine, path).start()
    assert _inode(path) == inode                    # not unlinked, not replaced
    listener.accept()[0].close()                    # and it is still the listener's
    for sock in queued:
        sock.close()
    listener.close()


@pytest.mark.kvm
def test_the_lock_file_decides_who_serves(machine: Any, tmp_path: Path) -> None:
    import fcntl

    from kvmmem.vmm.qmp import QmpServer, QmpServerError

    path = tmp_path / "qmp.sock"
    with QmpServer(machine, path):
        lock = tmp_path / "qmp.sock.lock"
        assert lock.exists() and (os.stat(lock).st_mode & 0o777) == 0o600
        inode = _inode(path)
        with pytest.raises(QmpServerError, match="another process is serving"):
            QmpServer(machine, path).start()
        assert _inode(path) == inode
        client = Client(path)
        assert client.ask(b'{"execute": "query-status"}')["return"]["status"] == "running"
        client.close()
    assert not path.exists() and not lock.exists()          # both removed on close

    # A process that holds the lock owns the path even when its socket is
    # not answering (busy, or between bind and listen): never taken over.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))                                    # a socket nobody listens on
    stale.close()
    held = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX)
    inode = _inode(path)
    with pytest.raises(QmpServerError, match="another process is serving"):
        QmpServer(machine, path).start()
    assert _inode(path) == inode
    os.close(held)                                            # its owner is gone: stale now
    with QmpServer(machine, path):                          # replaced the stale socket
        client = Client(path)
        assert client.ask(b'{"execute": "query-status"}')["return"]["running"]
        client.close()
    assert not path.exists() and not lock.exists()


# -- host signals (issue 13, point 11) --------------------------------------------

@pytest.mark.kvm
@pytest.mark.parametrize("signum", [2, 15, 1], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_host_signal_shuts_down_once_removes_the_socket_and_exits_0(vmm_factory: Any,
                                                                     signum: int) -> None:
    vmm = vmm_factory()
    client = Client(vmm.sock)
    assert client.ask(b'{"execute": "query-status"}')["return"]["status"] == "running"
    os.kill(vmm.pid, signum)
    try:
        os.kill(vmm.pid, signum)                 # a second one while it stops: still once
    except ProcessLookupError:
        pass
    rest = [strict_loads(line) for line in client.reader.readlines()]      # until EOF
    client.close()
    assert vmm.wait() == 0
    shutdowns = [m for m in rest if m.get("event") == "SHUTDOWN"]
    assert [m["data"] for m in shutdowns] == [{"guest": False, "reason": "host-signal"}]
    assert not vmm.sock.exists() and not Path(f"{vmm.sock}.lock").exists()
    assert vmm.stderr().splitlines() == [
        f"kvmmem run: terminating on signal {signum} from pid {os.getpid()}"]


def test_duplicate_object_ids_are_refused() -> None:
    from kvmmem.vmm.cli import OptionError, parse_args, parse_machine

    argv = ["-kernel", "k", "-m", "1G,maxmem=9G",
            "-object", "memory-backend-ram,id=mem0,size=1G",
            "-object", "memory-backend-ram,id=mem0,size=2G"]
    with pytest.raises(OptionError) as info:
        parse_machine(parse_args(argv), None)
    assert info.value.option == "-object"
    assert "attempt to add duplicate property 'mem0'" in str(info.value)


def test_duplicate_device_ids_are_refused() -> None:
    from kvmmem.vmm.cli import OptionError, parse_args, parse_machine

    argv = ["-kernel", "k", "-m", "1G,maxmem=9G",
            "-device", "virtio-mem,id=v,size=1G", "-device", "virtio-mem,id=v,size=2G"]
    with pytest.raises(OptionError) as info:
        parse_machine(parse_args(argv), None)
    assert (info.value.option, str(info.value)) == ("-device", "-device: Duplicate ID 'v' for device")


@pytest.mark.kvm
def test_qom_set_of_a_requested_size_over_the_metadata_limit_is_refused(vmm_factory: Any) -> None:
    vmm = vmm_factory("-machine", "memslot-metadata-limit=8M")
    client = Client(vmm.sock)
    path = "/machine/peripheral/vmem0"
    reply = client.ask(json.dumps({"execute": "qom-set", "arguments": {
        "path": path, "property": "requested-size", "value": 4 * GiB}}).encode())
    assert reply["error"]["class"] == "GenericError"
    assert "exceeds memslot-metadata-limit=8.0 MiB" in reply["error"]["desc"]
    assert client.ask(json.dumps({"execute": "qom-get", "arguments": {
        "path": path, "property": "requested-size"}}).encode()) == {"return": 128 * MiB}
    client.close()
    assert vmm.quit() == 0
