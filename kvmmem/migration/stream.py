"""kvmmem's migration stream: a versioned sequence of checked sections.

    stream   = MAGIC "KVMMEMIG" (8 bytes), version (u32 LE), section*, an END section
    section  = kind (u8), name length (u16 LE), name (UTF-8),
               payload length (u64 LE), payload, CRC-32 of kind, name and payload (u32 LE)

Kinds: CONFIG (JSON: what the destination must have been started with),
STATE (JSON: one device's state, by name), RAM (u64 LE offset into the named
host memory, then whole pages), END (empty). DESIGN.md, "Migration stream",
says in which order a machine writes them.

The reader is the destination's first line of defence: every length is
bounded before anything is allocated, every section's CRC is checked, and
any breach is one :class:`StreamError` that says what and where.
"""

from __future__ import annotations

import enum
import json
import struct
import zlib
from typing import IO, Any

__all__ = ["MAGIC", "MAX_NAME", "MAX_SECTION", "VERSION", "Kind", "StreamError", "StreamReader",
           "StreamWriter"]

MAGIC = b"KVMMEMIG"
VERSION = 1
MAX_NAME = 256
MAX_SECTION = 64 << 20            # RAM goes in chunks of at most this much
_HEADER = struct.Struct("<8sI")
_SECTION = struct.Struct("<BH")
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


class Kind(enum.IntEnum):
    CONFIG = 1
    STATE = 2
    RAM = 3
    END = 0xFF


class StreamError(ValueError):
    """The stream is not one this kvmmem can load (truncated, corrupted, other version...)."""


class StreamWriter:
    """Writes sections to a binary file object; counts the bytes written."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.transferred = 0
        self._write(_HEADER.pack(MAGIC, VERSION))

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.transferred += len(data)

    def section(self, kind: Kind, name: str, payload: bytes) -> None:
        raw = name.encode()
        if len(raw) > MAX_NAME or len(payload) > MAX_SECTION:
            raise ValueError(f"section {name!r} too large for the stream")
        head = _SECTION.pack(kind, len(raw)) + raw
        crc = zlib.crc32(payload, zlib.crc32(head))
        self._write(head + _LENGTH.pack(len(payload)))
        self._write(payload)
        self._write(_CRC.pack(crc))

    def json(self, kind: Kind, name: str, value: Any) -> None:
        self.section(kind, name, json.dumps(value, separators=(",", ":")).encode())

    def ram(self, name: str, offset: int, data: bytes) -> None:
        self.section(Kind.RAM, name, _LENGTH.pack(offset) + data)

    def end(self) -> None:
        self.section(Kind.END, "", b"")
        self.out.flush()


class StreamReader:
    """Reads and checks sections from a binary file object."""

    def __init__(self, source: IO[bytes]) -> None:
        self.source = source
        self.position = 0
        magic, version = _HEADER.unpack(self._read(_HEADER.size, "the header"))
        if magic != MAGIC:
            raise StreamError("not a kvmmem migration stream (bad magic)")
        if version != VERSION:
            raise StreamError(f"stream version {version}, this kvmmem reads version {VERSION}")

    def _read(self, size: int, what: str) -> bytes:
        data = self.source.read(size)
        if data is None or len(data) != size:
            raise StreamError(f"truncated stream: {what} at byte {self.position} is cut short")
        self.position += size
        return data

    def section(self) -> tuple[Kind, str, bytes]:
        """The next section: (kind, name, payload)."""
        start = self.position
        kind_raw, name_len = _SECTION.unpack(self._read(_SECTION.size, "a section header"))
        if name_len > MAX_NAME:
            raise StreamError(f"section at byte {start}: name of {name_len} bytes")
        raw_name = self._read(name_len, "a section name")
        (length,) = _LENGTH.unpack(self._read(_LENGTH.size, "a section length"))
        if length > MAX_SECTION:
            raise StreamError(f"section at byte {start}: {length} bytes, more than {MAX_SECTION}")
        payload = self._read(length, f"section {raw_name!r}")
        (crc,) = _CRC.unpack(self._read(_CRC.size, "a section checksum"))
        if zlib.crc32(payload, zlib.crc32(_SECTION.pack(kind_raw, name_len) + raw_name)) != crc:
            raise StreamError(f"section at byte {start}: checksum mismatch (corrupted stream)")
        try:
            kind = Kind(kind_raw)
            name = raw_name.decode()
        except (ValueError, UnicodeDecodeError):
            raise StreamError(f"section at byte {start}: unknown kind {kind_raw} or bad "
                              "name") from None
        return kind, name, payload

    @staticmethod
    def parse_json(name: str, payload: bytes) -> Any:
        try:
            return json.loads(payload)
        except ValueError as exc:
            raise StreamError(f"section {name!r}: not JSON: {exc}") from None

    @staticmethod
    def parse_ram(name: str, payload: bytes) -> tuple[int, bytes]:
        if len(payload) < _LENGTH.size:
            raise StreamError(f"RAM section {name!r} without an offset")
        (offset,) = _LENGTH.unpack_from(payload)
        return offset, payload[_LENGTH.size:]
