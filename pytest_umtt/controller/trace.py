"""A record of every message and grant with its virtual time.

Off by default; when on, each event costs one tuple append. Later layers write it out
as JSON lines and compare runs for determinism.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
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
        self.events: list[TraceEvent] = []

    def add(self, event: TraceEvent) -> None:
        self.events.append(event)

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
