"""Where two runs part: the first event that differs, in virtual time, with context.

A run's fingerprint (:meth:`pytest_umtt.simulation.Simulation.fingerprint`) lists protocol
and device events, console lines and command results, each with its virtual time. Put in
one timeline (by virtual time, then machine, then kind), two runs with one seed must be
the same list; the first place they are not is where the runs diverged: its virtual time,
its machine, its kind (protocol message, device kick or interrupt, console line, command
result) and both values, with each run's console lines of that machine around it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import NS_PER_S, format_ns

FINGERPRINT_FILE = "fingerprint.txt"
"""In a test's artifacts: its run's fingerprint, one item a line (``umtt-trace diff``)."""
CONTEXT_LINES = 3
"""Console lines shown before and after the divergence, on each side."""
_KIND_ORDER = {"protocol": 0, "device": 1, "console": 2, "result": 3}
_CONSOLE = re.compile(r"^console (\S+) \[(-?\d+)\.(\d{9}) s\] (.*)$", re.DOTALL)
_RESULT = re.compile(r"^result (\S+) (.*) (-?\d+)\.(\d{9}) s\.\.(-?\d+)\.(\d{9}) s (.*)$",
                     re.DOTALL)


@dataclass(frozen=True, slots=True)
class Event:
    """One item of a run: when, on which machine, what kind, and its value."""

    time_ns: int
    machine: str
    kind: str
    value: str

    def __str__(self) -> str:
        text = f"[{format_ns(self.time_ns)}] {self.machine} {self.kind}"
        return f"{text}: {self.value}" if self.value else text


def _ns(seconds: str, fraction: str) -> int:
    whole = int(seconds)
    return whole * NS_PER_S + (-1 if whole < 0 else 1) * int(fraction)


def trace_event(record: dict[str, object]) -> Event:
    """A protocol trace record (one line of ``trace.jsonl``) as an event."""
    client, kind = str(record.get("client", "")), str(record.get("kind", ""))
    detail = str(record.get("detail") or "")
    if client == "calendar" and "/" in detail.split(" ", 1)[0]:
        client = detail.split(" ", 1)[0]  # a call the calendar made for a device
    machine, _, device = client.partition("/")
    if kind.startswith("device-"):
        kind = f"device {kind.removeprefix('device-')}" + (f" ({device})" if device else "")
    elif kind in ("rx", "tx"):
        kind = f"protocol {'from' if kind == 'rx' else 'to'} the kernel"
    elif kind == "call":
        kind = "calendar call"
    else:
        kind = f"protocol {kind}"
    value = f"{record.get('op')}(seq={record.get('seq')}, time={record.get('time')})" \
        if record.get("op") else ""
    if record.get("detail"):
        value = f"{value} {record['detail']}".strip()
    return Event(int(str(record.get("now", 0))), machine, kind, value)


def parse_line(line: str) -> Event:
    """One fingerprint line as an event (an unknown line keeps its text, at time 0)."""
    if line.startswith("{"):
        try:
            return trace_event(json.loads(line))
        except (ValueError, TypeError):
            pass
    if found := _CONSOLE.match(line):
        return Event(_ns(found[2], found[3]), found[1], "console line", found[4])
    if found := _RESULT.match(line):
        return Event(_ns(found[3], found[4]), found[1], "command result",
                     f"{found[2]} ended at {format_ns(_ns(found[5], found[6]))} {found[7]}")
    return Event(0, "?", "other", line)


def timeline(lines: Sequence[str]) -> list[Event]:
    """A run's events in order of virtual time (then machine, then kind; events that tie
    keep the order they were listed in)."""
    events = [parse_line(line) for line in lines]
    order = sorted(range(len(events)), key=lambda i: (
        events[i].time_ns, events[i].machine, _KIND_ORDER.get(events[i].kind.split()[0], 4), i))
    return [events[i] for i in order]


@dataclass(frozen=True)
class Divergence:
    """The first event two runs do not share, and each run's console around it."""

    index: int
    first: Event | None
    second: Event | None
    labels: tuple[str, str]
    context: tuple[list[str], list[str]]

    @property
    def where(self) -> Event:
        """The event that locates the divergence (the earlier of the two)."""
        both = [e for e in (self.first, self.second) if e is not None]
        return min(both, key=lambda e: e.time_ns)

    def __str__(self) -> str:
        where = self.where
        lines = [f"first divergence at virtual time {format_ns(where.time_ns)} on "
                 f"{where.machine}: {where.kind} (event {self.index} of the timeline)"]
        for label, event in zip(self.labels, (self.first, self.second), strict=True):
            lines.append(f"  {label}: {event if event is not None else '(the run ended)'}")
        for label, context in zip(self.labels, self.context, strict=True):
            lines.append(f"  {where.machine}'s console around it, {label}:")
            lines += [f"    {line}" for line in context] or ["    (no console lines)"]
        return "\n".join(lines)


def first_divergence(one: Sequence[str], two: Sequence[str],
                     labels: tuple[str, str] = ("first run", "second run")) -> Divergence | None:
    """Where two runs' fingerprints part in virtual time; None when they are the same."""
    first, second = timeline(one), timeline(two)
    index = next((i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b),
                 None if len(first) == len(second) else min(len(first), len(second)))
    if index is None:
        return None
    found = (first[index] if index < len(first) else None,
             second[index] if index < len(second) else None)
    where = min((e for e in found if e is not None), key=lambda e: e.time_ns)
    return Divergence(index, *found, labels,
                      (console_around(first, where), console_around(second, where)))


def console_around(events: Sequence[Event], where: Event,
                   count: int = CONTEXT_LINES) -> list[str]:
    """The machine's console lines just before and after the divergence's instant."""
    console = [e for e in events if e.machine == where.machine and e.kind == "console line"]
    split = next((i for i, e in enumerate(console) if e.time_ns > where.time_ns), len(console))
    return [f"[{format_ns(e.time_ns)}] {e.value}"
            for e in console[max(0, split - count):split + count]]


def first_difference(one: Sequence[str], two: Sequence[str], context: int = 3) -> str | None:
    """Where two fingerprints part item by item, as listed (not in virtual time, as
    :func:`first_divergence` orders them), with a little context; None when equal."""
    index = next((i for i, (a, b) in enumerate(zip(one, two, strict=False)) if a != b),
                 None if len(one) == len(two) else min(len(one), len(two)))
    if index is None:
        return None
    start = max(0, index - context)

    def show(lines: Sequence[str]) -> str:
        part = lines[start:index + context + 1]
        shown = [f"  {'>' if start + i == index else ' '} {start + i}: {line}"
                 for i, line in enumerate(part)]
        if index >= len(lines):
            shown.append(f"  > {index}: (ends here)")
        return "\n".join(shown)

    return (f"first difference at item {index} of {len(one)} / {len(two)}:\n"
            f"first run:\n{show(one)}\nsecond run:\n{show(two)}")
