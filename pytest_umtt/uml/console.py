"""A machine's console, read in virtual time.

In time-travel modes UML writes console output with blocking writes, so everything a
kernel printed before its WAIT is already in the pty then (DESIGN.md fact 5). That holds
only while the output descriptor stays blocking: see launch.separate_console_output. Output is
therefore stamped at the WAIT that ends the kernel's run: with the free run capped at
``max_free_run``, a stamp is at most that much later than the instant of printing.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import NS_PER_S, format_ns
from .splats import NON_FATAL_BUGS, Splat, SplatScanner

CRASH_PATTERNS = (
    (re.compile(r"Attempted to kill init!"), "the guest agent (init) exited"),
    (re.compile(r"Kernel panic - not syncing: (.*)"), "kernel panic"),
    (re.compile(r"kernel BUG at .*"), "kernel BUG"),
    # Not the BUGs the kernel reports and survives (KASAN, KFENCE, a soft lockup...):
    # those are splats (splats.py), and the machine goes on.
    (re.compile(rf"\bBUG: (?!{'|'.join(NON_FATAL_BUGS)}).*"), "kernel BUG"),
    (re.compile(r"\bOops: .*"), "kernel oops"),
    # UML re-executes itself to reboot and would come back as a new client: unsupported.
    (re.compile(r"reboot: Restarting system"), "the guest rebooted (reboot is not supported; "
     "poweroff ends a machine)"),
    # A sysrq reset (echo b > /proc/sysrq-trigger) prints only this before UML re-executes.
    (re.compile(r"sysrq: Resetting"), "the guest rebooted (sysrq reset; reboot is not "
     "supported, poweroff ends a machine)"),
)


@dataclass(frozen=True, slots=True)
class ConsoleLine:
    """One line the kernel printed, and the virtual time it was seen: ``time`` in
    seconds, ``time_ns`` exact."""

    time_ns: int
    text: str

    @property
    def time(self) -> float:
        return self.time_ns / NS_PER_S

    def __str__(self) -> str:
        return f"[{format_ns(self.time_ns)}] {self.text}"


class Console:
    """Everything one machine printed, as stamped lines, plus a log file on disk.

    Work is linear in the output: lines are kept with their offsets, the whole text is
    joined only when asked for, and :meth:`search` looks at a window from a given
    line on, so a waiting expect() rescans only what is new."""

    def __init__(self, log_path: Path, machine: str = "") -> None:
        self.log_path = log_path
        self._log: BinaryIO = log_path.open("wb")
        self.lines: list[ConsoleLine] = []
        self._offsets: list[int] = []
        self._length = 0
        self._partial = ""
        self._joined = ""
        self._joined_lines = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self.crash: tuple[str, ConsoleLine] | None = None
        self._splats = SplatScanner(machine or log_path.name.removesuffix(".console.log"))

    @property
    def splats(self) -> list[Splat]:
        """The reports the kernel printed and survived (WARNING, KASAN, lockdep...), in
        the order their first lines were seen (splats.py)."""
        return self._splats.splats

    @property
    def text(self) -> str:
        """Everything printed so far, as one string (lines end in ``\\n``)."""
        if self._joined_lines < len(self.lines):
            self._joined = "".join([self._joined, *(line.text + "\n" for line in
                                                     self.lines[self._joined_lines:])])
            self._joined_lines = len(self.lines)
        return self._joined + self._partial

    @property
    def held_bytes(self) -> int:
        """Output read but not yet stamped."""
        return self._pending_bytes

    @property
    def end_of_lines(self) -> int:
        """The offset in :attr:`text` where the line still being printed starts."""
        return self._length

    def hold(self, data: bytes) -> None:
        """Output read while the kernel runs: its time is known only at the next WAIT."""
        self._pending.append(data)
        self._pending_bytes += len(data)

    def stamp(self, time: int) -> None:
        """Give held output its time (the WAIT that ended the run)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._pending_bytes = 0
            self._feed(data, time)

    def feed(self, data: bytes, time: int) -> None:
        """Output with a known time; output still held was printed before it and goes
        first, with the same time."""
        self.hold(data)
        self.stamp(time)

    def _feed(self, data: bytes, time: int) -> None:
        self._log.write(data)
        self._log.flush()
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "")
        *complete, self._partial = (self._partial + text).split("\n")
        for raw in complete:
            line = ConsoleLine(time, raw)
            self.lines.append(line)
            self._offsets.append(self._length)
            self._length += len(raw) + 1
            self._look_for_crash(line)
            self._splats.feed(line)

    def search(self, regex: re.Pattern[str], start: int) -> tuple[int, re.Match[str]] | None:
        """The first match of ``regex`` at or after offset ``start`` of :attr:`text`,
        reading only from the line that holds ``start``: the match (its positions are
        in that window) and the window's offset in :attr:`text`."""
        first = max(0, bisect.bisect_right(self._offsets, start) - 1)
        base = self._offsets[first] if first < len(self._offsets) else self._length
        window = "".join([*(line.text + "\n" for line in self.lines[first:]), self._partial])
        found = regex.search(window, start - base)
        return None if found is None else (base, found)

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
        if not self.lines:
            return 0
        index = bisect.bisect_right(self._offsets, offset) - 1
        return self.lines[max(0, min(index, len(self.lines) - 1))].time_ns

    def close(self) -> None:
        self._log.close()
