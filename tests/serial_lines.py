"""A guest's serial output, cut into lines for the tests.

The machine hands the serial sink whatever bytes the guest wrote, which may
end in the middle of a line; ``SerialLines`` keeps the unfinished part and
hands every complete line, decoded, to ``on_line`` (and keeps it in ``lines``).
"""

from __future__ import annotations

from collections.abc import Callable


class SerialLines:
    def __init__(self, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.on_line = on_line
        self._partial = b""

    def __call__(self, data: bytes) -> None:
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            self.lines.append(line)
            if self.on_line is not None:
                self.on_line(line)
