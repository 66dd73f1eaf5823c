"""Splats: reports the kernel prints about a bug and then goes on running.

A ``WARNING:`` from WARN_ON(), lockdep, UBSAN, KASAN, KFENCE, kmemleak, a hung task, an
RCU stall, a soft lockup, a refcount_t saturation: each prints a report on the console
and the kernel carries on (unless told to panic on them), so the machine is not crashed
(console.CRASH_PATTERNS) but the code under test has a bug. :class:`SplatScanner` reads
console lines as they come and cuts them into :class:`Splat` records, each from its
header to its end, bounded: the guest's console is hostile input.

Where a report ends, by the kernel's own printing code:

- ``---[ end trace ... ]---`` (kernel/panic.c print_oops_end_marker) closes a WARNING or a
  refcount_t report (both through __warn), and UBSAN's (lib/ubsan.c ubsan_epilogue);
- a line of ``=`` closes KASAN's and KFENCE's (mm/kasan/report.c end_report,
  mm/kfence/report.c kfence_report_error);
- kmemleak's ``N new suspected memory leaks`` closes the unreferenced objects listed
  before it (mm/kmemleak.c kmemleak_scan, with kmemleak.verbose), or stands alone;
- the others (lockdep, hung task, RCU stall, soft lockup, the BUGs the kernel survives)
  have no end marker: they end where their ``Call Trace:`` does.

Output stamped later ends every report (one is printed in one go, within one run of the
kernel), and so does :data:`MAX_SPLAT_LINES`. A new header ends a report whose call
trace is done; one that comes earlier is a report printed inside it (UBSAN from the code
that prints a WARNING), after which the outer one goes on.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import format_ns
from ..signature import is_trace_line, signature, strip_printk_prefix


class StampedLine(Protocol):
    """A stamped console line as splats read it (:class:`.console.ConsoleLine` is one;
    the console imports this module, so this one names only what it reads)."""

    @property
    def time_ns(self) -> int: ...

    @property
    def time(self) -> float: ...

    @property
    def text(self) -> str: ...


MAX_SPLAT_LINES = 400
"""Lines kept of one report (KASAN's use-after-free with its allocation and free stacks
took 124 here): a report without its end does not swallow the console."""
SCAN_CHARS = 512
"""Characters of a line looked at for headers, ends and frames: a 2 MB line costs what a
short one does."""
MAX_NESTED = 3
"""Reports read at once: one, another printed inside it, and one inside that."""
RENDER_LINES = 120
RENDER_WIDTH = 300
"""How much of a report a failure shows: its first lines, each cut (the whole report is
in the console log)."""
CONTEXT_LINES = 3
"""Lines before a header that may belong to its report: the ``cut here`` or ``=====``
line, and on architectures that print it first, a WARN()'s message."""

NON_FATAL_BUGS = (r"KASAN:", r"KFENCE:", r"soft lockup", r"sleeping function called",
                  r"scheduling while atomic", r"scheduling in a non-blocking",
                  r"assuming (?:atomic|non migratable) context", r"workqueue (?:lockup|leaked)",
                  r"Bad page (?:state|map)", r"Bad rss-counter", r"non-zero pgtables_bytes",
                  r"spinlock ", r"rwlock ", r"using \S+ in preemptible",
                  r"key \S+ has not been registered", r"looking up invalid subclass",
                  r"MAX_\w+ too low", r"Invalid wait context")
"""``BUG:`` reports after which the kernel goes on (KASAN, KFENCE, the soft-lockup
watchdog, might_sleep(), the scheduler, workqueues, the page allocator, spinlock and
lockdep debugging): splats, not crashes."""

_NON_FATAL_BUG = "|".join(NON_FATAL_BUGS)

HEADERS: tuple[tuple[str, str, str], ...] = (
    # (kind, pattern at the start of the line, how the report ends)
    ("WARNING", r"WARNING: CPU: \d+ PID: \d+ at ", "end-trace"),
    ("lockdep", r"WARNING: (?:possible (?:circular|recursive|irq)|inconsistent lock state"
                r"|suspicious RCU usage|bad unlock balance|bad contention|held lock freed"
                r"|lock held when returning|Nested lock was not taken|chain_key collision"
                r"|\S+-safe -> \S+-unsafe lock order|.{1,64} still has locks held)"
                r"|\[ BUG: Invalid wait context \]",
     "call-trace"),
    ("refcount", r"refcount_t: ", "end-trace"),
    ("UBSAN", r"UBSAN: ", "end-trace"),
    ("KASAN", r"BUG: KASAN: ", "rule"),
    ("KFENCE", r"BUG: KFENCE: ", "rule"),
    ("soft lockup", r"(?:watchdog: )?BUG: soft lockup", "call-trace"),
    ("BUG", rf"BUG: (?:{_NON_FATAL_BUG})", "call-trace"),
    ("kmemleak", r"kmemleak: unreferenced object ", "kmemleak"),
    ("kmemleak", r"kmemleak: \d+ new suspected memory leaks?\b", "line"),
    ("hung task", r"INFO: task .{1,64}:\d+ blocked for more than \d+ seconds", "call-trace"),
    ("RCU stall", r"(?:rcu: )?INFO: \S+ (?:self-)?detected stalls?\b", "call-trace"),
)
"""Every splat header: its kind, the start of its line, and what ends its report."""

_HEADER = re.compile("|".join(f"(?P<h{index}>{pattern})"
                              for index, (_, pattern, _) in enumerate(HEADERS)))
END_TRACE = re.compile(r"---\[ end trace\b")
RULE = re.compile(r"={20,}\s*$")
CUT_HERE = re.compile(r"-+\[ cut here \]-+\s*$")
CALL_TRACE = re.compile(r"\s*Call Trace:\s*$")
KMEMLEAK_SUMMARY = re.compile(r"kmemleak: \d+ new suspected memory leak")
WARNING_KIND = "WARNING"


def header_kind(text: str) -> tuple[str, str] | None:
    """The kind of splat a console line starts and how its report ends, or None."""
    found = _HEADER.match(strip_printk_prefix(text[:SCAN_CHARS]))
    if found is None or found.lastgroup is None:
        return None
    kind, _, end = HEADERS[int(found.lastgroup[1:])]
    return kind, end


@dataclass(eq=False)
class Splat:
    """One report the kernel printed and survived: its ``kind`` (``WARNING``,
    ``lockdep``, ``refcount``, ``UBSAN``, ``KASAN``, ``KFENCE``, ``soft lockup``, ``BUG``,
    ``kmemleak``, ``hung task``, ``RCU stall``), the ``machine`` that printed it, and its
    console ``lines`` with their virtual times, from the report's first line (``cut
    here`` or ``=====`` where the kernel prints one) to its end. Lines keep arriving
    until ``complete``; ``truncated`` when it outgrew :data:`MAX_SPLAT_LINES`."""

    kind: str
    machine: str
    header: StampedLine
    """The line that made it a splat (``WARNING: CPU: 0 PID: 1 at ...``)."""
    lines: list[StampedLine] = field(default_factory=list)
    complete: bool = False
    truncated: bool = False

    @property
    def time_ns(self) -> int:
        """When its first line was seen (virtual ns)."""
        return self.header.time_ns

    @property
    def time(self) -> float:
        """When its first line was seen (virtual seconds)."""
        return self.header.time

    @property
    def signature(self) -> str:
        """Its kind and the first frames of its call trace (:mod:`pytest_umtt.signature`)."""
        # From the header on (a report without a trace is known by its header line); past
        # kmemleak's prefix, which it puts on every line, frames included (pr_fmt).
        start = next(index for index, line in enumerate(self.lines) if line is self.header)
        prefix = "kmemleak: " if self.kind == "kmemleak" else ""
        return signature(self.kind, (strip_printk_prefix(line.text[:SCAN_CHARS])
                                     .removeprefix(prefix) for line in self.lines[start:]))

    def render(self, max_lines: int = RENDER_LINES, width: int = RENDER_WIDTH) -> str:
        """The report for a human: what, where, when, its signature, then its lines
        with their virtual times (at most ``max_lines``, each cut at ``width``)."""
        state = ("" if self.complete else " (its end was not seen)") + (
            f" (cut at {MAX_SPLAT_LINES} lines)" if self.truncated else "")
        shown = [f"[{format_ns(line.time_ns)}] {line.text[:width]}"
                 + ("..." if len(line.text) > width else "") for line in self.lines[:max_lines]]
        if len(self.lines) > max_lines:
            shown.append(f"... {len(self.lines) - max_lines} more lines in the console log")
        return "\n".join([f"{self.kind} on {self.machine} at {format_ns(self.time_ns)}{state}",
                          f"signature: {self.signature}", *shown])


@dataclass
class _Reading:
    """A report being read: the splat, what ends it, and whether its call trace began."""

    splat: Splat
    end: str
    in_trace: bool = False


class SplatScanner:
    """Cuts one machine's console lines into :class:`Splat` records, appended to
    :attr:`splats` when their header arrives (so a splat belongs to whatever was running
    when its first line was seen) and completed as the rest comes.

    A report may print another inside it (UBSAN in the code that prints a WARNING): the
    inner one is a splat of its own, and the outer one goes on after it ends."""

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.splats: list[Splat] = []
        self._reading: list[_Reading] = []
        """The report being read last; the ones it interrupted before it."""
        self._recent: deque[StampedLine] = deque(maxlen=CONTEXT_LINES)

    def feed(self, line: StampedLine) -> None:
        """One more console line."""
        text = strip_printk_prefix(line.text[:SCAN_CHARS])
        header = header_kind(text)
        if self._reading and line.time_ns != self._reading[-1].splat.time_ns:
            # A report is printed in one go, within one run of the kernel: output
            # stamped later is not part of it, nor of any report it interrupted.
            while self._reading:
                self._close(complete=self._reading[-1].splat.complete)
        if self._reading and self._takes(self._reading[-1], header, text, line):
            return
        if header is not None:
            self._start(header, line)
        else:
            self._recent.append(line)

    def _takes(self, reading: _Reading, header: tuple[str, str] | None, text: str,
               line: StampedLine) -> bool:
        """Add ``line`` to the report being read if it belongs there (False: it is to be
        looked at as a line of its own)."""
        splat = reading.splat
        if _ends(reading.end, text):
            splat.lines.append(line)
            self._close(complete=True)
            return True
        if header is not None and not _same_report(reading, header[0]):
            if splat.complete:  # a whole report (its call trace seen) ends here
                self._close(complete=True)
            return False  # else the new one interrupts it
        if reading.in_trace and reading.end == "call-trace" and not is_trace_line(text):
            self._close(complete=splat.complete)
            return self._reading_takes(header, text, line)
        splat.lines.append(line)
        if reading.in_trace and reading.end == "call-trace":
            # Whole once its call trace has begun: what follows is more of the same.
            splat.complete = splat.complete or is_trace_line(text)
        reading.in_trace = reading.in_trace or CALL_TRACE.match(text) is not None
        if len(splat.lines) >= MAX_SPLAT_LINES:
            splat.truncated = True
            self._close(complete=False)
        return True

    def _reading_takes(self, header: tuple[str, str] | None, text: str,
                       line: StampedLine) -> bool:
        """After a report ended: the one it interrupted, if any, may take the line."""
        return bool(self._reading) and self._takes(self._reading[-1], header, text, line)

    def _start(self, header: tuple[str, str], line: StampedLine) -> None:
        kind, end = header
        if len(self._reading) >= MAX_NESTED:
            self._reading.pop(0)  # reports that never end cannot pile up: drop the oldest
        splat = Splat(kind, self.machine, line, [*self._context(line.time_ns), line])
        self.splats.append(splat)
        self._reading.append(_Reading(splat, end))
        self._recent.clear()
        if end == "line":
            self._close(complete=True)

    def _context(self, at_ns: int) -> list[StampedLine]:
        """The lines before a header from its report's opening line on, if one is near:
        ``cut here`` (and what followed it), or a line of ``=``."""
        recent = [line for line in self._recent if line.time_ns == at_ns]
        for index in range(len(recent) - 1, -1, -1):
            text = strip_printk_prefix(recent[index].text[:SCAN_CHARS])
            if CUT_HERE.match(text) or RULE.match(text):
                return recent[index:]
        return []

    def _close(self, complete: bool) -> None:
        reading = self._reading.pop()
        reading.splat.complete = complete
        self._recent.clear()


def _same_report(reading: _Reading, kind: str) -> bool:
    """A refcount_t message and the WARNING that __warn prints with it are one report, in
    either order (the message comes first where the architecture has __WARN_FLAGS, after
    it on UML)."""
    splat = reading.splat
    if {splat.kind, kind} != {"refcount", WARNING_KIND} or reading.in_trace:
        return False
    if kind == "refcount":
        splat.kind = "refcount"
    return True


def _ends(end: str, text: str) -> bool:
    """Whether ``text`` is the last line of a report that ends as ``end`` says."""
    if END_TRACE.search(text):
        return True
    if end == "rule":
        return RULE.match(text) is not None
    return end == "kmemleak" and KMEMLEAK_SUMMARY.match(text) is not None
