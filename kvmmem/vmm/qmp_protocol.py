"""QMP's message rules: framing a byte stream, strict JSON, error classes
and QAPI-style argument checks.

QMP has no framing: a client may send several objects on one line, one
object over many lines, or garbage. Like QEMU's JSON streamer the splitter
only follows brackets and strings to find where each top-level value ends,
so a broken message costs one error reply and the next message parses. It
also bounds what a client can make the server hold: a message larger than
``max_size`` or nested deeper than ``max_depth`` is reported once and then
skipped to its end without being buffered. A control character outside the
JSON whitespace resets the splitter, the recovery QEMU's spec recommends.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

MAX_MESSAGE_SIZE = 64 * 1024
MAX_DEPTH = 1024

_CLOSERS = {ord("}"): ord("{"), ord("]"): ord("[")}
# Bytes that end a run inside a string, inside a container, in a top-level scalar.
_IN_STRING = re.compile(rb'["\\\x00-\x1f\xff]')
_IN_CONTAINER = re.compile(rb'[{}\[\]"\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_IN_SCALAR = re.compile(rb'[{}\[\]"\n\x00-\x08\x0b\x0c\x0e-\x1f\xff]')
_START = re.compile(rb"[^ \t\r\n]")
_LEXICAL_ERROR = set(range(0x20)) - {0x09, 0x0A, 0x0D} | {0xFF}


@dataclass(frozen=True)
class StreamError:
    """Input the splitter refused; the server answers it with an error."""

    desc: str


class JsonSplitter:
    """Feed bytes, get complete top-level JSON texts (or StreamErrors) back."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE, max_depth: int = MAX_DEPTH) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._stack = bytearray()      # open brackets of the current message
        self._excess = 0               # brackets open beyond max_depth (not kept)
        self._in_string = False
        self._escaped = False
        self._scalar = False           # a top-level non-container value is running
        self._skipping = False         # over a limit: follow the structure, keep nothing

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held now."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | StreamError]:
        out: list[bytes | StreamError] = []
        i, n = 0, len(data)
        while i < n:
            i = self._step(data, i, out)
        return out

    # -- the state machine: each step consumes at least one byte ----------

    def _step(self, data: bytes, i: int, out: list[bytes | StreamError]) -> int:
        if self._in_string:
            return self._string_step(data, i, out)
        if self._stack:
            return self._container_step(data, i, out)
        if self._scalar:
            return self._scalar_step(data, i, out)
        m = _START.search(data, i)
        if m is None:
            return len(data)
        j = m.start()
        c = data[j]
        if c in _LEXICAL_ERROR:
            return self._lexical_error(c, j, out)
        if c in _CLOSERS:
            out.append(StreamError(f"JSON parse error, unexpected '{chr(c)}'"))
            return j + 1
        if c in b"{[":
            self._stack.append(c)
        elif c == ord('"'):
            self._in_string = True
        else:
            self._scalar = True
        self._keep(data[j:j + 1], out)
        return j + 1

    def _string_step(self, data: bytes, i: int, out: list[bytes | StreamError]) -> int:
        if self._escaped:
            self._escaped = False
            if data[i] in _LEXICAL_ERROR:
                return self._lexical_error(data[i], i, out)
            self._keep(data[i:i + 1], out)
            return i + 1
        m = _IN_STRING.search(data, i)
        j = m.start() if m else len(data)
        self._keep(data[i:j], out)
        if m is None:
            return j
        c = data[j]
        if c in _LEXICAL_ERROR:
            return self._lexical_error(c, j, out)
        self._keep(data[j:j + 1], out)
        if c == ord("\\"):
            self._escaped = True
        else:
            self._in_string = False
            if not self._stack and not self._scalar:
                self._finish(out)          # a top-level string: complete
        return j + 1

    def _container_step(self, data: bytes, i: int, out: list[bytes | StreamError]) -> int:
        m = _IN_CONTAINER.search(data, i)
        j = m.start() if m else len(data)
        self._keep(data[i:j], out)
        if m is None:
            return j
        c = data[j]
        if c in _LEXICAL_ERROR:
            return self._lexical_error(c, j, out)
        self._keep(data[j:j + 1], out)
        if c == ord('"'):
            self._in_string = True
        elif c in b"{[":
            if len(self._stack) < self.max_depth:
                self._stack.append(c)
            else:
                self._excess += 1
                if not self._skipping:
                    self._start_skipping(out, "JSON parse error, nesting deeper than "
                                              f"{self.max_depth} levels")
        elif self._excess:
            self._excess -= 1
        elif self._stack[-1] != _CLOSERS[c]:
            self._reset()
            out.append(StreamError(f"JSON parse error, '{chr(c)}' does not close "
                                   "the open bracket"))
        else:
            self._stack.pop()
            if not self._stack:
                self._finish(out)
        return j + 1

    def _scalar_step(self, data: bytes, i: int, out: list[bytes | StreamError]) -> int:
        m = _IN_SCALAR.search(data, i)
        j = m.start() if m else len(data)
        self._keep(data[i:j], out)
        if m is None:
            return j
        c = data[j]
        if c in _LEXICAL_ERROR:
            return self._lexical_error(c, j, out)
        self._finish(out)          # the scalar ends; what ends it starts the next value
        return j + (c == ord("\n"))

    # -- helpers ------------------------------------------------------------

    def _keep(self, chunk: bytes, out: list[bytes | StreamError]) -> None:
        if self._skipping:
            return
        self._buf += chunk
        if len(self._buf) > self.max_size:
            self._start_skipping(out, f"QMP input exceeds {self.max_size} bytes "
                                      "(the message is discarded)")

    def _start_skipping(self, out: list[bytes | StreamError], why: str) -> None:
        out.append(StreamError(why))
        self._skipping = True
        self._buf = bytearray()

    def _finish(self, out: list[bytes | StreamError]) -> None:
        if not self._skipping:
            out.append(bytes(self._buf))
        self._reset()

    def _lexical_error(self, c: int, j: int, out: list[bytes | StreamError]) -> int:
        self._reset()
        out.append(StreamError(f"JSON parse error, invalid byte {c:#04x} in the input"))
        return j + 1


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    # RFC 8259 section 6 lets an implementation limit the range of numbers;
    # one that overflows a double (1e400) would become Infinity, which no
    # JSON text can carry back, so it is refused like QEMU's lexer refuses
    # the Infinity and NaN tokens.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is not a finite number")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def parse_json(text: bytes) -> Any:
    """Strict JSON as QEMU's parser takes it: UTF-8, no NaN/Infinity (nor a
    number too large for a double), no duplicate keys. Raises ValueError
    with the reason."""
    try:
        return json.loads(text.decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_finite_float,
                          object_pairs_hook=_object_without_duplicates)
    except RecursionError:
        raise ValueError("nesting too deep") from None


def encode_message(message: dict[str, Any]) -> bytes:
    """One message on the wire: strict JSON (RFC 8259) and ``\\r\\n``. A
    message that has no strict JSON form (a NaN or an infinity somewhere, or
    a value JSON has no type for) becomes a GenericError reply, with the message's ``id`` if it has one."""
    try:
        return json.dumps(message, allow_nan=False).encode() + b"\r\n"
    except (ValueError, TypeError) as exc:
        error: dict[str, Any] = {"error": {"class": str(ErrorClass.GENERIC),
                                           "desc": f"the reply is not valid JSON: {exc}"}}
        try:
            return json.dumps({**error, "id": message["id"]}, allow_nan=False).encode() + b"\r\n"
        except (KeyError, ValueError):
            return json.dumps(error).encode() + b"\r\n"


# -- errors and arguments ---------------------------------------------------------

class ErrorClass(StrEnum):
    """QMP error classes (QEMU's qapi/error.json)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_FOUND = "DeviceNotFound"


class QmpError(Exception):
    """A command failed; becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1
_TYPE_NAMES = {"str": "string", "int": "integer", "bool": "boolean", "[str]": "array",
               "any": "any"}


def has_type(value: Any, kind: str) -> bool:
    """Whether ``value`` (parsed JSON) is of the argument type ``kind``."""
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and \
            _INT_MIN <= value <= _INT_MAX
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return kind == "any"


def check_arguments(params: Mapping[str, str], args: Mapping[str, Any]) -> None:
    """QAPI's checks: no unknown member, required members present, each of
    its type. ``params`` maps names to types, ``*name`` marks optional ones."""
    known = {name.lstrip("*"): kind for name, kind in params.items()}
    for key in args:
        if key not in known:
            raise QmpError(f"Parameter '{key}' is unexpected")
    for name, kind in params.items():
        key = name.lstrip("*")
        if key not in args:
            if not name.startswith("*"):
                raise QmpError(f"Parameter '{key}' is missing")
        elif not has_type(args[key], kind):
            raise QmpError(f"Invalid parameter type for '{key}', expected: {_TYPE_NAMES[kind]}")
