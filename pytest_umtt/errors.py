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


class MachineError(UmttError):
    """Something went wrong with one UML machine; says which, when, and shows its console."""

    def __init__(self, machine: str, what: str, now_ns: int, console_tail: str = "",
                 log: str | None = None) -> None:
        self.machine = machine
        self.what = what
        self.now_ns = now_ns
        """When it happened, exact (ns)."""
        self.console_tail = console_tail
        self.log = log
        text = f"{machine}: {what} (at virtual time {format_ns(now_ns)})"
        if console_tail or log:
            text += f"\n--- console tail{f' ({log})' if log else ''} ---\n{console_tail}"
        super().__init__(text)

    @property
    def now(self) -> float:
        """When it happened, in virtual seconds."""
        return self.now_ns / 1e9


class BootError(MachineError):
    """The kernel did not come up: it could not run, connect, or start its agent."""


class MachineCrashed(MachineError):
    """The kernel panicked, oopsed or hit a BUG, or its process died."""


class MachineStalled(MachineError):
    """The guest stopped virtual time from moving (a busy loop, say)."""


class CommandTimeout(MachineError):
    """A command did not finish within its virtual timeout."""


class ExpectTimeout(MachineError):
    """The console did not show the expected pattern within the virtual timeout."""


class SocketInUseError(UmttError):
    """Another controller is listening on the socket path."""


class ClockError(UmttError):
    """A virtual clock was about to go backwards, from ``now`` to ``when``: a bug in
    whatever drives the clock (the calendar, or a device model on its own)."""

    def __init__(self, now: int, when: int) -> None:
        super().__init__(f"the clock would go backwards from {format_ns(now)} "
                         f"to {format_ns(when)}")
        self.now = now
        self.when = when
