"""A machine's console, read in virtual time.

In time-travel modes UML writes console output with blocking writes, so everything a
kernel printed before its WAIT is already in the pty then (DESIGN.md fact 5). Output is
therefore stamped at the WAIT that ends the kernel's run: with the free run capped at
``max_free_run``, a stamp is at most that much later than the instant of printing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .errors import format_ns

CRASH_PATTERNS = (
    (re.compile(r"Attempted to kill init!"), "the guest agent (init) exited"),
    (re.compile(r"Kernel panic - not syncing: (.*)"), "kernel panic"),
    (re.compile(r"kernel BUG at .*"), "kernel BUG"),
    (re.compile(r"\bBUG: .*"), "kernel BUG"),
    (re.compile(r"\bOops: .*"), "kernel oops"),
)


@dataclass(frozen=True, slots=True)
class ConsoleLine:
    """One line the kernel printed, and the virtual time it was seen."""

    time: int
    text: str

    def __str__(self) -> str:
        return f"[{format_ns(self.time)}] {self.text}"


class Console:
    """Everything one machine printed, as stamped lines, plus a log file on disk."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._log: BinaryIO = log_path.open("wb")
        self.lines: list[ConsoleLine] = []
        self.text = ""
        self._partial = ""
        self._pending: list[bytes] = []
        self.crash: tuple[str, ConsoleLine] | None = None

    def hold(self, data: bytes) -> None:
        """Output read while the kernel runs: its time is known only at the next WAIT."""
        self._pending.append(data)

    def stamp(self, time: int) -> None:
        """Give held output its time (the WAIT that ended the run)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self.feed(data, time)

    def feed(self, data: bytes, time: int) -> None:
        """Output with a known time; output still held was printed before it and goes
        first, with the same time."""
        if self._pending:
            self._pending.append(data)
            self.stamp(time)
            return
        self._log.write(data)
        self._log.flush()
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "")
        self.text += text
        *complete, self._partial = (self._partial + text).split("\n")
        for raw in complete:
            line = ConsoleLine(time, raw)
            self.lines.append(line)
            self._look_for_crash(line)

    def _look_for_crash(self, line: ConsoleLine) -> None:
        if self.crash is not None:
            return
        for pattern, cause in CRASH_PATTERNS:
            if pattern.search(line.text):
                self.crash = (cause, line)
                return

    def tail(self, count: int = 25) -> str:
        """The last ``count`` lines, each with its virtual time."""
        shown = [str(line) for line in self.lines[-count:]]
        if self._partial:
            shown.append(f"[...] {self._partial}")
        return "\n".join(shown)

    def time_at(self, offset: int) -> int:
        """The virtual time of the line that holds ``offset`` of :attr:`text`."""
        position = 0
        for line in self.lines:
            position += len(line.text) + 1
            if offset < position:
                return line.time
        return self.lines[-1].time if self.lines else 0

    def close(self) -> None:
        self._log.close()
