"""Exceptions of pytest-umtt: one base class, subclasses that carry their context."""

from __future__ import annotations


def format_ns(ns: int) -> str:
    """Render a virtual time in nanoseconds as seconds with nanosecond precision."""
    sign = "-" if ns < 0 else ""
    seconds, rest = divmod(abs(ns), 1_000_000_000)
    return f"{sign}{seconds}.{rest:09d} s"


class UmttError(Exception):
    """Base class of every error pytest-umtt raises."""


class ProtocolError(UmttError):
    """A client broke the time-travel protocol; the calendar dropped it and went on."""

    def __init__(self, client: str, detail: str, now: int, message: str | None = None) -> None:
        self.client = client
        self.detail = detail
        self.now = now
        self.message = message
        where = f" on {message}" if message else ""
        super().__init__(f"{client}: {detail}{where} at virtual time {format_ns(now)}")


class StallError(UmttError):
    """Virtual time did not move for longer than the wall-clock budget allowed."""

    def __init__(self, now: int, waited: float, waiting_for: str) -> None:
        self.now = now
        self.waited = waited
        self.waiting_for = waiting_for
        super().__init__(
            f"virtual time stalled at {format_ns(now)} for {waited:.1f} s wall "
            f"(waiting for {waiting_for})"
        )


class CalendarClosedError(UmttError):
    """The calendar was used after close()."""
