"""QEMU's migration commands on kvmmem's QMP monitor, and ``-incoming``.

Commands (added to a :class:`~kvmmem.vmm.qmp_commands.MachineMonitor`):

- ``migrate`` ``{"uri": "file:PATH" | "unix:PATH" | "exec:CMD"}``: starts a live
  migration (:class:`~kvmmem.migration.precopy.MigrationJob`) and returns at
  once; MIGRATION events say ``setup``, ``active``, ``completed`` (the source
  then stays stopped), ``failed`` or ``cancelled``. A snapshot is ``stop``
  then ``migrate`` to ``file:``. Refused while one runs, and with QEMU's
  blocker wording for a vhost-user disk;
- ``query-migrate``: ``status``, ``setup-time``, ``total-time``, ``downtime``,
  ``ram`` (``transferred``, ``remaining``, ``total``, ``dirty-sync-count``,
  ``dirty-pages-rate``), ``error-desc``; ``{}`` before any migration;
- ``migrate_cancel``; ``migrate-set-parameters`` (``downtime-limit`` in ms,
  ``max-bandwidth`` in bytes a second) and ``query-migrate-parameters``.

``incoming(machine, uri)`` loads a stream into a machine before it runs
(``kvmmem run ... -incoming file:PATH | unix:PATH | exec:CMD``); with
``-incoming defer`` the URI comes later with QMP ``migrate-incoming``.
"""

from __future__ import annotations

import argparse
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from kvmmem.migration.machine_state import blockers, load_machine
from kvmmem.migration.precopy import DEFAULT_DOWNTIME_LIMIT_MS, MigrationJob
from kvmmem.migration.stream import StreamError, StreamReader
from kvmmem.vmm.machine import Machine
from kvmmem.vmm.qmp import QmpServer
from kvmmem.vmm.qmp_commands import Command, MachineMonitor
from kvmmem.vmm.qmp_protocol import QmpError
from kvmmem.vmm.qmp_socket import listen_unix, unlink_if

__all__ = ["MigrationCommands", "incoming", "open_outgoing", "run_extension"]

INCOMING_TIMEOUT = 600.0

log = logging.getLogger(__name__)


def open_outgoing(uri: str) -> tuple[IO[bytes], Callable[[], None]]:
    """A writable stream for a migration URI, and how to close it."""
    kind, _, rest = uri.partition(":")
    if not rest:
        raise ValueError(f"invalid migration URI {uri!r}: file:PATH, unix:PATH or exec:CMD")
    if kind == "file":
        f = open(rest, "wb")                   # noqa: SIM115 - closed by the job
        return f, f.close
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.connect(rest)
        out = sock.makefile("wb")

        def close() -> None:
            out.close()
            sock.close()
        return out, close
    if kind == "exec":
        proc = subprocess.Popen(["/bin/sh", "-c", rest], stdin=subprocess.PIPE)
        assert proc.stdin is not None
        stdin = proc.stdin

        def close_exec() -> None:
            stdin.close()
            proc.wait()
        return stdin, close_exec
    raise ValueError(f"invalid migration URI {uri!r}: file:PATH, unix:PATH or exec:CMD")


class MigrationCommands:
    """The migration commands of one monitor."""

    def __init__(self, machine: Machine, monitor: MachineMonitor) -> None:
        self.machine = machine
        self.monitor = monitor
        self.job: MigrationJob | None = None
        self.downtime_limit_ms = DEFAULT_DOWNTIME_LIMIT_MS
        self.max_bandwidth = 0
        for command in (
                Command("migrate", self._migrate, {"uri": "str", "*detach": "bool"}),
                Command("query-migrate", self._query),
                Command("migrate_cancel", self._cancel),
                Command("migrate-set-parameters", self._set_parameters,
                        {"*downtime-limit": "int", "*max-bandwidth": "int"}),
                Command("query-migrate-parameters", self._parameters)):
            monitor.commands[command.name] = command

    def wait_for_incoming(self, stop: Callable[[], bool]) -> str | None:
        """``-incoming defer``: offer ``migrate-incoming`` and wait for its URI
        (None if ``stop`` says the machine is to end meanwhile)."""
        arrived: list[str] = []
        event = threading.Event()

        def migrate_incoming(args: dict[str, Any]) -> None:
            if event.is_set():
                raise QmpError("The incoming migration has already been started")
            kind = str(args["uri"]).partition(":")[0]
            if kind not in ("file", "unix", "exec"):
                raise QmpError(f"invalid migration URI {args['uri']!r}: file:PATH, unix:PATH "
                               "or exec:CMD")
            arrived.append(args["uri"])
            event.set()

        self.monitor.commands["migrate-incoming"] = Command("migrate-incoming", migrate_incoming,
                                                            {"uri": "str"})
        while not event.wait(0.2):
            if stop():
                return None
        return arrived[0]

    def _migrate(self, args: dict[str, Any]) -> None:
        if self.job is not None and not self.job.finished:
            raise QmpError("There's a migration process in progress")
        if self.monitor.shut_down:
            raise QmpError("The machine has shut down")
        reasons = blockers(self.machine)
        if reasons:
            raise QmpError(f"disallowing migration blocker ({reasons[0]})")
        try:
            out, close = open_outgoing(args["uri"])
        except (OSError, ValueError) as exc:
            raise QmpError(f"Failed to start migration to {args['uri']!r}: {exc}") from None
        self.job = MigrationJob(self.machine, out, close, self._status,
                                self.downtime_limit_ms, self.max_bandwidth)
        self.job.start()

    def _status(self, status: str) -> None:
        self.monitor.emit("MIGRATION", {"status": status})
        if status == "completed":
            self.monitor.emit("STOP", None)

    def _query(self, args: dict[str, Any]) -> dict[str, Any]:
        return {} if self.job is None else self.job.info()

    def _cancel(self, args: dict[str, Any]) -> None:
        if self.job is not None:
            self.job.cancel()

    def _set_parameters(self, args: dict[str, Any]) -> None:
        limit = args.get("downtime-limit", self.downtime_limit_ms)
        bandwidth = args.get("max-bandwidth", self.max_bandwidth)
        if not 0 <= limit <= 2_000_000:
            raise QmpError("Parameter 'downtime_limit' expects an integer in the range of 0 to "
                           "2000 seconds")
        if bandwidth < 0:
            raise QmpError("Parameter 'max_bandwidth' expects a non-negative size")
        self.downtime_limit_ms, self.max_bandwidth = limit, bandwidth

    def _parameters(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"downtime-limit": self.downtime_limit_ms, "max-bandwidth": self.max_bandwidth}


def incoming(machine: Machine, uri: str, stop: Callable[[], bool] = lambda: False) -> float:
    """Load the stream at ``uri`` into ``machine`` (built, not run); the seconds
    it took. ``unix:PATH`` listens there for one connection (``stop`` ends the
    wait). Raises StreamError (a bad stream) or OSError/ValueError (the URI)."""
    kind, _, rest = uri.partition(":")
    if kind == "file" and rest:
        with open(rest, "rb") as f:
            t0 = time.monotonic()
            load_machine(machine, StreamReader(f))
            return time.monotonic() - t0
    if kind == "unix" and rest:
        # The path appears only once it listens; a file there that is not a
        # stale socket is refused and kept (listen_unix).
        listener, inode = listen_unix(rest, 1)
        try:
            listener.settimeout(0.2)
            deadline = time.monotonic() + INCOMING_TIMEOUT
            while True:
                try:
                    conn, _ = listener.accept()
                    break
                except TimeoutError:
                    if stop() or time.monotonic() > deadline:
                        raise OSError(f"no migration arrived on {rest}") from None
            conn.settimeout(None)
            with conn, conn.makefile("rb") as f:
                t0 = time.monotonic()
                load_machine(machine, StreamReader(f))
                return time.monotonic() - t0
        finally:
            listener.close()
            unlink_if(rest, inode)
    if kind == "exec" and rest:
        proc = subprocess.Popen(["/bin/sh", "-c", rest], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        with proc.stdout as f:
            t0 = time.monotonic()
            load_machine(machine, StreamReader(f))
            took = time.monotonic() - t0
        proc.wait()
        return took
    raise ValueError(f"invalid migration URI {uri!r}: file:PATH, unix:PATH or exec:CMD")


def run_extension(machine: Machine, server: QmpServer | None, args: argparse.Namespace) -> int | None:
    """``kvmmem run``'s migration: the QMP commands, and ``-incoming`` loaded
    before the vCPU runs (a stream that cannot be loaded: one line, status 1)."""
    commands = MigrationCommands(machine, server.monitor) if server is not None else None
    if args.incoming is None:
        return None
    uri = args.incoming
    if uri == "defer":                        # the URI comes with migrate-incoming
        if commands is None:
            print("kvmmem run: -incoming: defer needs -qmp (migrate-incoming gives the URI)",
                  file=sys.stderr)
            return 2
        deferred = commands.wait_for_incoming(lambda: machine.stop_requested)
        if deferred is None:
            return 0
        uri = deferred
    try:
        took = incoming(machine, uri, lambda: machine.stop_requested)
    except (StreamError, OSError, ValueError) as exc:
        if machine.stop_requested:
            return 0
        print(f"kvmmem run: -incoming: {exc}", file=sys.stderr)
        return 1
    log.info("incoming migration loaded in %.0f ms", took * 1e3)
    return None
