"""Snapshot, restore and migration: the stream format (``stream``), a machine's
state into and out of it (``machine_state``). Above the VMM layer: it reads
and writes a :class:`~kvmmem.vmm.machine.Machine`, which knows nothing of it."""

from kvmmem.migration.machine_state import MigrationError, load_machine, save_machine
from kvmmem.migration.stream import StreamError, StreamReader, StreamWriter

__all__ = ["MigrationError", "StreamError", "StreamReader", "StreamWriter", "load_machine",
           "save_machine"]
