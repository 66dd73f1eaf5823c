"""Shared fixtures for pytest-umtt's own tests."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from pytest_umtt import Calendar, Client, Trace
from tests.refclient import RefClient

Connect = Callable[..., tuple[Client, RefClient]]


def settle(calendar: Calendar) -> None:
    """Do everything the calendar can do without waiting for a client."""
    while calendar.step(0):
        pass


@pytest.fixture
def calendar() -> Iterator[Calendar]:
    with Calendar(trace=Trace()) as cal:
        yield cal


@pytest.fixture
def connect(calendar: Calendar) -> Iterator[Connect]:
    """Make reference clients on socketpairs served by ``calendar``."""
    made: list[RefClient] = []

    def make(cal: Calendar = calendar, label: str | None = None) -> tuple[Client, RefClient]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ref = RefClient(theirs, timeout=5.0)
        made.append(ref)
        return cal.attach(ours, label), ref

    yield make
    for ref in made:
        ref.close()
