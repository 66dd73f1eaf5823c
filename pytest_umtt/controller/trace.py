"""A record of every message and grant with its virtual time.

Off by default; when on, each event the calendar records on its hot path costs one tuple
append (:meth:`Trace.record`): the :class:`TraceEvent` is made only when someone reads the
trace. Later layers write it out as JSON lines and compare runs for determinism.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TextIO


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One thing the calendar saw or did.

    ``kind`` is ``rx`` (from a client), ``tx`` (to a client), or an event name such as
    ``join``, ``drop`` or ``call``; ``now`` is the calendar's virtual time then.
    """

    now: int
    kind: str
    client: str
    op: str = ""
    seq: int = 0
    time: int = 0
    detail: str = ""


class Trace:
    """An append-only list of TraceEvent."""

    def __init__(self) -> None:
        self._events: list[TraceEvent] = []
        # Recorded and not yet made into events: a frozen dataclass costs about 1.5 us to
        # make, a tuple 0.05 us, and the calendar records three per kernel run.
        self._raw: list[TraceEvent | tuple[int, str, str, str, int, int, str]] = []
        # A subclass that acts on each event as it comes (prints it, say) gets it at once.
        self._eager = type(self).add is not Trace.add

    @property
    def events(self) -> list[TraceEvent]:
        """Every event so far, in order."""
        if self._raw:
            self._events.extend(fields if isinstance(fields, TraceEvent)
                                else TraceEvent(*fields) for fields in self._raw)
            self._raw.clear()
        return self._events

    def add(self, event: TraceEvent) -> None:
        self._raw.append(event)

    def recorder(self) -> Callable[[tuple[int, str, str, str, int, int, str]], None]:
        """What records an event's fields: :meth:`record` for a trace that acts on each
        event as it comes, else (cheaper: the calendar records three per run) the bound
        ``append`` of the list they wait in."""
        return self.record if self._eager else self._raw.append

    def record(self, fields: tuple[int, str, str, str, int, int, str]) -> None:
        """Add the event these fields make, in TraceEvent's order (as :meth:`add`
        would), cheaply."""
        if self._eager:
            self.add(TraceEvent(*fields))
        else:
            self._raw.append(fields)

    def __iter__(self) -> Iterator[TraceEvent]:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)

    def of_kind(self, *kinds: str) -> list[TraceEvent]:
        """The events whose kind is one of ``kinds``."""
        return [event for event in self.events if event.kind in kinds]

    def write_jsonl(self, stream: TextIO, client: str | None = None) -> None:
        """Write one JSON object per line (only ``client``'s events, if given, and its
        devices': they are named ``client/device``)."""
        stream.writelines(json.dumps(asdict(event), sort_keys=True) + "\n"
                          for event in self.events
                          if client is None or event.client == client
                          or event.client.startswith(f"{client}/"))
