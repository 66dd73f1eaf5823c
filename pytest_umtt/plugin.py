"""The pytest plugin: thin glue over the calendar (and, later, machines)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .calendar import Calendar
from .trace import Trace


@pytest.fixture
def umtt_calendar() -> Iterator[Calendar]:
    """A fresh calendar with tracing on, closed after the test."""
    with Calendar(trace=Trace()) as calendar:
        yield calendar
