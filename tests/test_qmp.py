"""The QMP server, driven as QEMU's users drive QEMU.

A real guest runs under KVM in a thread; the ``qemu.qmp`` library (PyPI)
resizes its virtio-mem device through ``qom-set`` and follows the
``MEMORY_DEVICE_SIZE_CHANGE`` events, while the guest reports on its UART
what it has plugged: both must agree with ``query-memory-devices``. Raw
sockets send garbage next to a well-behaved client, which must keep
working, and so must the guest. The JSON splitter and argument checks have
unit tests of their own.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import queue
import re
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from qmp_client import RawQmpClient as RawClient
from serial_lines import SerialLines

from kvmmem.vmm.qmp_protocol import JsonSplitter, QmpError, StreamError, check_arguments, parse_json

MiB, GiB = 1 << 20, 1 << 30
STEP = re.compile(r"plugged=(\d+) requested=(\d+) ok")
DEVICE = "/machine/peripheral/vmem0"
TIMEOUT = 30


# -- the JSON splitter and argument checks (no KVM) ------------------------------

def _feed_all(splitter: JsonSplitter, chunks: list[bytes]) -> list[Any]:
    frames = [f for chunk in chunks for f in splitter.feed(chunk)]
    return [f if isinstance(f, StreamError) else parse_json(f) for f in frames]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8)


@given(messages=st.lists(st.dictionaries(st.text(max_size=6), _json_values, max_size=4),
                         min_size=1, max_size=5),
       separators=st.lists(st.sampled_from(["", "\n", " ", "\r\n", "\t\n "]), min_size=5,
                           max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6))
def test_splitter_finds_every_message_however_the_stream_is_cut(messages, separators, cuts) -> None:  # type: ignore[no-untyped-def]
    stream = "".join(json.dumps(m) + separators[i] for i, m in enumerate(messages)).encode()
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:])]
    assert _feed_all(JsonSplitter(), chunks) == messages


def test_splitter_keeps_brackets_and_quotes_inside_strings() -> None:
    text = rb'{"a": "}{ ]\" [", "b": ["\\", "{"]}'
    assert _feed_all(JsonSplitter(), [text]) == [{"a": '}{ ]" [', "b": ["\\", "{"]}]


def test_splitter_reports_an_oversized_message_once_and_recovers() -> None:
    splitter = JsonSplitter(max_size=1000)
    big = b'{"execute": "x", "arguments": {"s": "' + b"a" * 5000 + b'"}}'
    frames = _feed_all(splitter, [big[:2000], big[2000:], b'{"ok": 1}\n', b"y" * 3000 + b"\n"])
    assert [type(f) for f in frames] == [StreamError, dict, StreamError]
    assert "exceeds 1000 bytes" in frames[0].desc and frames[1] == {"ok": 1}
    assert splitter.pending == 0


def test_splitter_bounds_nesting_and_memory() -> None:
    splitter = JsonSplitter(max_size=10**9, max_depth=50)
    frames = _feed_all(splitter, [b"[" * 100_000, b"]" * 100_000, b'{"ok": true}'])
    assert len(frames) == 2 and "nesting deeper than 50" in frames[0].desc
    assert frames[1] == {"ok": True} and splitter.pending == 0


def test_splitter_recovers_from_control_characters_and_bad_brackets() -> None:
    splitter = JsonSplitter()
    frames = [f for chunk in (b'{"execute": "qu', b"\x00", b'{"id": 1}', b'{"a": [1}',
                              b'] {"id": 2}', b"nul\n", b'"s"') for f in splitter.feed(chunk)]
    errors = [f.desc for f in frames if isinstance(f, StreamError)]
    assert [f for f in frames if not isinstance(f, StreamError)] == \
        [b'{"id": 1}', b'{"id": 2}', b"nul", b'"s"']
    assert len(errors) == 3 and "invalid byte 0x00" in errors[0]
    assert "does not close" in errors[1] and "unexpected ']'" in errors[2]
    assert splitter.pending == 0


@pytest.mark.parametrize("text", [b'{"a": NaN}', b'{"a": 1, "a": 2}', b"\xff{}", b"{"])
def test_parse_json_is_strict(text: bytes) -> None:
    with pytest.raises(ValueError):
        parse_json(text)


@pytest.mark.parametrize("args,message", [
    ({}, "Parameter 'path' is missing"),
    ({"path": 1}, "Invalid parameter type for 'path', expected: string"),
    ({"path": "/", "n": True}, "Invalid parameter type for 'n', expected: integer"),
    ({"path": "/", "n": 1 << 64}, "Invalid parameter type for 'n', expected: integer"),
    ({"path": "/", "x": 1}, "Parameter 'x' is unexpected"),
])
def test_arguments_are_checked_as_qapi_does(args: dict[str, Any], message: str) -> None:
    with pytest.raises(QmpError) as err:
        check_arguments({"path": "str", "*n": "int"}, args)
    assert err.value.desc == message and err.value.error_class == "GenericError"
    check_arguments({"path": "str", "*n": "int"}, {"path": "/", "n": -5})


# -- a running guest -------------------------------------------------------------

class GuestVm:
    """The test guest in a Machine run by a thread, with a QMP server; the
    guest's UART lines arrive in ``lines``."""

    def __init__(self, guest: Path, sock: Path, cmdline: str = "",
                 requested: int = 256 * MiB, memslots: str = "dynamic",
                 device_size: int = 4 * GiB, merge_delay: int = 100) -> None:
        from kvmmem.devices.virtio_mem import VirtioMemProps
        from kvmmem.memory import HostMemory
        from kvmmem.vmm.machine import Machine, MachineConfig
        from kvmmem.vmm.qmp import QmpServer

        self.lines: queue.Queue[str] = queue.Queue()
        self._serial = SerialLines(self.lines.put)
        device = VirtioMemProps(id="vmem0", memdev=HostMemory(device_size, "mem0"),
                                requested_size=requested, memslots=memslots,
                                merge_delay=merge_delay)
        self.machine = Machine(MachineConfig(ram_size=512 * MiB, kernel=str(guest),
                                             maxmem=512 * MiB + device_size + 4 * GiB,
                                             cmdline=cmdline,
                                             memory_devices=[device], serial=self._serial))
        self.dev = self.machine.devices["vmem0"]
        self.sock = sock
        self.server = QmpServer(self.machine, sock)
        self.status: list[int] = []
        self.thread = threading.Thread(target=lambda: self.status.append(self.machine.run()))

    def wait_reached(self) -> int:
        """Wait until the guest says it is waiting; return the plugged size
        it reported last."""
        plugged = None
        while True:
            line = self.lines.get(timeout=TIMEOUT)
            assert "mismatch" not in line and "error" not in line, line
            step = STEP.search(line)
            if step:
                plugged = int(step[1])
            if line == "waiting for a config change":
                assert plugged is not None, "the guest reported no step"
                return plugged

    def __enter__(self) -> GuestVm:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.thread.is_alive():
            self.machine.shutdown(1)
            self.thread.join(TIMEOUT)
        self.server.close()
        self.machine.close()


async def _events_until(qmp: Any, done: Any, seen: list[dict[str, Any]]) -> None:
    """Collect events into ``seen`` until ``done(seen)`` holds."""
    while not done(seen):
        event = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
        seen.append({"event": event["event"], **event.get("data", {})})


def _sizes(seen: list[dict[str, Any]]) -> list[int]:
    return [e["size"] for e in seen if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE"]


def _reached(size: int) -> Any:
    return lambda seen: size in _sizes(seen)[-1:]


@pytest.mark.kvm
def test_qemu_qmp_resizes_a_running_guest_and_sees_matching_sizes(guest_elf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qmp_lib = importlib.import_module("qemu.qmp")   # a test dependency: never skipped
    with GuestVm(guest_elf, tmp_path / "qmp.sock", cmdline="kvmmem.read_unplugged=1") as vm:
        far = vm.dev.addr + vm.dev.region_size - vm.dev.block_size

        async def scenario() -> None:
            qmp = qmp_lib.QMPClient("kvmmem-test")
            await qmp.connect(str(vm.sock))
            vm.thread.start()
            seen: list[dict[str, Any]] = []
            await _events_until(qmp, _reached(256 * MiB), seen)
            assert vm.wait_reached() == 256 * MiB
            unplugged = [e for e in seen if e["event"] == "X_KVMMEM_UNPLUGGED_ACCESS"]
            assert [(e["device"], e["address"], e["write"]) for e in unplugged] == \
                [("vmem0", far, False)]
            assert all(e["qom-path"] == DEVICE and e["id"] == "vmem0"
                       for e in seen if e["event"] == "MEMORY_DEVICE_SIZE_CHANGE")

            names = {c["name"] for c in await qmp.execute("query-commands")}
            assert {"qom-set", "query-memory-devices", "x-query-memslots", "quit"} <= names
            assert await qmp.execute("query-status") == {"status": "running", "running": True}
            assert {"name": "vmem0", "type": "child<virtio-mem>"} in \
                await qmp.execute("qom-list", {"path": "/machine/peripheral"})
            props = {p["name"]: p["type"] for p in await qmp.execute("qom-list", {"path": DEVICE})}
            assert props["requested-size"] == "size" and props["memslots"] == "string"
            mode = await qmp.execute("qom-get", {"path": DEVICE, "property": "memslots"})
            assert mode == "dynamic"
            slot_size = await qmp.execute("qom-get", {"path": "vmem0", "property": "memslot-size"})

            for requested in (640 * MiB, 128 * MiB, 896 * MiB, 384 * MiB):
                before = _sizes(seen)[-1]
                seen.clear()
                await qmp.execute("qom-set", {"path": DEVICE, "property": "requested-size",
                                              "value": requested})
                await _events_until(qmp, _reached(requested), seen)
                sizes = [before] + _sizes(seen)
                assert sizes == (sorted(sizes) if requested > before else sorted(sizes)[::-1])
                assert vm.wait_reached() == requested                      # the guest's view
                [info] = await qmp.execute("query-memory-devices")
                assert info == {"type": "virtio-mem", "data": {
                    "id": "vmem0", "memaddr": vm.dev.addr, "requested-size": requested,
                    "size": requested, "max-size": 4 * GiB, "block-size": vm.dev.block_size,
                    "node": 0, "memdev": "/objects/mem0"}}
                size = await qmp.execute("qom-get", {"path": DEVICE, "property": "size"})
                assert size == requested
                slots = [s for s in await qmp.execute("x-query-memslots") if s.get("device")]
                assert len(slots) == -(-requested // slot_size)            # dynamic: plugged ones
                assert all(s["region"] == "mem0" and s["alias"].startswith("virtio-mem-memslot-")
                           for s in slots)
                tree = await qmp.execute("human-monitor-command", {"command-line": "info mtree"})
                assert tree.count(": alias virtio-mem-memslot-") == len(slots)
                assert "\r\n" in tree and "device-memory" in tree

            flat = await qmp.execute("human-monitor-command", {"command-line": "info mtree -f"})
            assert sum(1 for line in flat.splitlines() if "): mem0" in line and " KVM" in line) >= 1
            devices = await qmp.execute("human-monitor-command",
                                        {"command-line": "info memory-devices"})
            assert devices.startswith('Memory device [virtio-mem]: "vmem0"\r\n')
            assert f"  size: {384 * MiB}\r\n" in devices
            assert "  memdev: /objects/mem0\r\n" in devices

            seen.clear()
            await qmp.execute("system_reset")
            await _events_until(qmp, lambda s: any(e["event"] == "RESET" for e in s)
                                and _reached(384 * MiB)(s), seen)
            reset = next(e for e in seen if e["event"] == "RESET")
            assert (reset["guest"], reset["reason"]) == (False, "host-qmp-system-reset")
            # unplugged, then re-plugged; the 0 between may be throttled away, as in QEMU
            assert vm.machine.resets == 1 and vm.dev.plugged_size == 384 * MiB
            assert vm.wait_reached() == 384 * MiB

            await qmp.execute("stop")
            assert (await qmp.events.get())["event"] == "STOP"
            assert await qmp.execute("query-status") == {"status": "paused", "running": False}
            await qmp.execute("cont")
            assert (await qmp.events.get())["event"] == "RESUME"

            await qmp.execute("quit")
            shutdown = await asyncio.wait_for(qmp.events.get(), TIMEOUT)
            assert shutdown["event"] == "SHUTDOWN" and shutdown["data"]["reason"] == "host-qmp-quit"
            await qmp.disconnect()

        asyncio.run(scenario())
        vm.thread.join(TIMEOUT)
        assert vm.status == [0]


@pytest.mark.kvm
@pytest.mark.parametrize("merge_delay", [0, 100])
def test_exact_memslots_over_qmp(guest_elf, tmp_path, merge_delay: int) -> None:  # type: ignore[no-untyped-def]
    """memslots=exact: the property, x-query-memslots and info mtree show
    memslots over exactly what the guest plugged, merged and split as it
    grows and shrinks (a 64 GiB device: its budget of 64 memslots holds).
    With a merge-delay the merges come a moment after the guest's last
    plug: x-query-memslots shows them once they did."""
    qmp_lib = importlib.import_module("qemu.qmp")
    with GuestVm(guest_elf, tmp_path / "qmp.sock", requested=640 * MiB, memslots="exact",
                 device_size=64 * GiB, merge_delay=merge_delay) as vm:

        async def scenario() -> None:
            qmp = qmp_lib.QMPClient("kvmmem-test")
            await qmp.connect(str(vm.sock))
            vm.thread.start()
            assert await qmp.execute("qom-get", {"path": DEVICE, "property": "memslots"}) == "exact"
            assert await qmp.execute("qom-get", {"path": DEVICE,
                                                 "property": "merge-delay"}) == merge_delay
            seen: list[dict[str, Any]] = []
            for requested, sizes in ((640 * MiB, [128 * MiB] * 5), (GiB, [GiB]),
                                     (1152 * MiB, [GiB, 128 * MiB]), (384 * MiB, [128 * MiB] * 3)):
                if requested != 640 * MiB:
                    await qmp.execute("qom-set", {"path": DEVICE, "property": "requested-size",
                                                  "value": requested})
                await _events_until(qmp, _reached(requested), seen)
                assert vm.wait_reached() == requested
                slots = [s for s in await qmp.execute("x-query-memslots") if s.get("device")]
                deadline = time.monotonic() + TIMEOUT
                while merge_delay and [s["size"] for s in slots] != sizes \
                        and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    slots = [s for s in await qmp.execute("x-query-memslots") if s.get("device")]
                assert [s["size"] for s in slots] == sizes
                assert sum(sizes) == requested and slots[0]["start"] == vm.dev.addr
                assert all(b["start"] == a["start"] + a["size"] for a, b in zip(slots, slots[1:]))
                assert all(s["region"] == "mem0" and s["alias"].startswith("virtio-mem-memslot-")
                           for s in slots)
                assert await qmp.execute("qom-get", {"path": DEVICE,
                                                     "property": "mapped-memslots"}) == len(sizes)
                tree = await qmp.execute("human-monitor-command", {"command-line": "info mtree"})
                assert tree.count(": alias virtio-mem-memslot-") == len(sizes)
            # 640 MiB -> 1 GiB and 1 GiB -> 1152 MiB: one deferred merge, by the merge thread
            assert vm.machine.merger.merges == (1 if merge_delay else 0)
            await qmp.execute("quit")
            await qmp.disconnect()

        asyncio.run(scenario())
        vm.thread.join(TIMEOUT)
        assert vm.status == [0]




def _error(reply: dict[str, Any]) -> tuple[str, str]:
    return reply["error"]["class"], reply["error"]["desc"]


@pytest.mark.kvm
def test_garbage_costs_error_replies_and_nothing_else(guest_elf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    qmp_lib = importlib.import_module("qemu.qmp")   # a test dependency: never skipped
    old_umask = os.umask(0)                   # the socket must be 0600 whatever the umask
    try:
        vm = GuestVm(guest_elf, tmp_path / "qmp.sock", requested=128 * MiB).__enter__()
    finally:
        os.umask(old_umask)
    try:
        assert stat.S_IMODE(os.stat(vm.sock).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(vm.sock).st_mode)
        vm.thread.start()
        assert vm.wait_reached() == 128 * MiB

        async def scenario() -> None:
            good = qmp_lib.QMPClient("good")
            await good.connect(str(vm.sock))

            raw = RawClient(vm.sock, negotiate=False)
            assert raw.greeting["QMP"]["capabilities"] == []
            assert raw.ask(b'{"execute": "query-status", "id": 1}') == {"id": 1, "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
            assert raw.ask(b'{"execute": "qmp_capabilities", "id": "c"}') == {"return": {},
                                                                             "id": "c"}
            assert _error(raw.ask(b'{"execute": "qmp_capabilities"}'))[0] == "CommandNotFound"
            assert raw.ask(b'{"execute":\n "query-status",\n "id": 2}\n')["return"]["running"]
            for junk in (b'{"execute": }\n', b'{"execute": "x", "id": NaN}\n', b"\x01\n"):
                assert _error(raw.ask(junk))[1].startswith("JSON parse error")
            for not_an_object in (b"[1, 2]\n", b"42\n", b'"quit"'):
                assert _error(raw.ask(not_an_object)) == ("GenericError",
                                                          "QMP input must be a JSON object")
            assert _error(raw.ask(b'{"execute": 42}')) == (
                "GenericError", "QMP input member 'execute' must be a string")
            assert _error(raw.ask(b'{"execute": "quit", "arguments": []}'))[1] == \
                "QMP input member 'arguments' must be an object"
            assert _error(raw.ask(b'{"exec": "quit"}'))[1] == \
                "QMP input member 'exec' is unexpected"
            reply = raw.ask(b'{"execute": "qom-get", "id": "t", '
                            b'"arguments": {"path": 5, "property": "size"}}')
            assert reply["id"] == "t" and _error(reply) == (
                "GenericError", "Invalid parameter type for 'path', expected: string")
            assert _error(raw.ask(b'{"execute": "no-such-command"}')) == (
                "CommandNotFound", "The command no-such-command has not been found")
            huge = b'{"execute": "quit", "arguments": {"x": "' + b"a" * 300_000 + b'"}}\n'
            assert "exceeds 65536 bytes" in _error(raw.ask(huge))[1]
            assert "exceeds 65536 bytes" in _error(raw.ask(b"z" * 200_000 + b"\n"))[1]
            two = raw.ask(b'{"execute": "query-status", "id": 3}'
                          b'{"execute": "query-status", "id": 4}')
            assert two["id"] == 3 and raw.read()["id"] == 4

            # QOM errors: unknown path or property, read-only property, bad values.
            def qom(args: dict[str, Any]) -> dict[str, Any]:
                return raw.ask(json.dumps({"execute": "qom-set" if "value" in args else "qom-get",
                                           "arguments": args}).encode())
            assert _error(qom({"path": "/machine/peripheral/nope", "property": "size"})) == (
                "DeviceNotFound", "Device '/machine/peripheral/nope' not found")
            assert _error(qom({"path": DEVICE, "property": "colour"})) == (
                "GenericError", "Property 'virtio-mem.colour' not found")
            assert _error(qom({"path": DEVICE, "property": "size", "value": GiB})) == (
                "GenericError", "Property 'virtio-mem.size' is not writable")
            for bad in ("1G", 3 * MiB, -2 * MiB, 64 * GiB, True):
                reply = qom({"path": DEVICE, "property": "requested-size", "value": bad})
                assert _error(reply)[0] == "GenericError"
            assert vm.dev.requested_size == 128 * MiB                   # nothing changed
            reply = raw.ask(b'{"execute": "human-monitor-command", '
                            b'"arguments": {"command-line": "info nothing"}}')
            assert reply == {"return": "unknown command: 'info nothing'\r\n"}

            # A client that leaves in the middle of a command, one that never negotiates.
            rude = RawClient(vm.sock)
            rude.sock.sendall(b'{"execute": "qom-set", "arguments": {"path": "/machine/periph')
            rude.close()
            RawClient(vm.sock, negotiate=False).close()

            # The well-behaved client and the guest carry on.
            seen: list[dict[str, Any]] = []
            await good.execute("qom-set", {"path": DEVICE, "property": "requested-size",
                                           "value": 512 * MiB})
            await _events_until(good, _reached(512 * MiB), seen)
            assert vm.wait_reached() == 512 * MiB
            assert raw.ask(b'{"execute": "query-status"}') == {
                "return": {"status": "running", "running": True}}
            assert [e["data"]["size"] for e in raw.events] == _sizes(seen)   # it got them too
            assert all(set(e["timestamp"]) == {"seconds", "microseconds"} for e in raw.events)
            raw.close()
            await good.disconnect()

        asyncio.run(scenario())
        assert vm.thread.is_alive() and vm.machine.resets == 0
    finally:
        vm.__exit__()
    assert not vm.sock.exists()                # close() removed the socket


@pytest.mark.kvm
def test_guest_resets_and_machine_exit_become_reset_and_shutdown_events(guest_elf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The guest resets itself each time it reaches requested-size: RESET
    says so (guest-reset); when the machine stops, close() says SHUTDOWN,
    disconnects the client and removes the socket."""
    with GuestVm(guest_elf, tmp_path / "qmp.sock", cmdline="kvmmem.reset=1",
                 requested=128 * MiB) as vm:
        raw = RawClient(vm.sock)
        vm.thread.start()
        while not any(e["event"] == "RESET" for e in raw.events):
            raw.events.append(json.loads(raw.reader.readline()))
        reset = next(e for e in raw.events if e["event"] == "RESET")
        assert reset["data"] == {"guest": True, "reason": "guest-reset"}
        assert vm.machine.resets >= 1
        vm.machine.shutdown(3)
        vm.thread.join(TIMEOUT)
        vm.server.close()
        rest = [json.loads(line) for line in raw.reader.readlines()]     # until EOF
        assert [e["data"] for e in rest if e["event"] == "SHUTDOWN"] == [
            {"guest": True, "reason": "guest-shutdown"}]
        assert vm.status == [3] and not vm.sock.exists()
        raw.close()


@pytest.mark.kvm
def test_socket_path_is_checked_and_a_stale_socket_replaced(guest_elf, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from kvmmem.vmm.qmp import QmpServer, QmpServerError

    with GuestVm(guest_elf, tmp_path / "live.sock") as vm:      # serving, machine not running
        for path, why in ((vm.sock, "another process is serving"),
                          (tmp_path / "file", "is not a socket"),
                          (tmp_path / ("x" * 120), "must have 1 to 107 bytes")):
            if path.name == "file":
                path.write_text("keep me")
            with pytest.raises(QmpServerError, match=why):
                QmpServer(vm.machine, path).start()
        assert (tmp_path / "file").read_text() == "keep me" and vm.sock.exists()

        stale = tmp_path / "stale.sock"
        socket.socket(socket.AF_UNIX).bind(str(stale))             # nobody listens on it
        with QmpServer(vm.machine, stale):
            client = RawClient(stale)
            assert client.ask(b'{"execute": "query-status"}')["return"]["running"]
            client.close()
        assert not stale.exists()
