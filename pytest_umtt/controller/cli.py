"""``umtt-controller``: the calendar as a standalone time-travel controller.

A drop-in for usfstl's controller (same options), for running UML by hand and for
side-by-side comparisons: it waits for ``--clients`` STARTs before acking any, serves
them in START-id order, exits 0 when the last client leaves, and removes its socket.
Unlike usfstl it survives misbehaving clients (they are dropped and reported), and it
keeps serving when every client waits with nothing scheduled: an idle kernel can still
be woken by a device interrupt, and a new kernel may still connect.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

from ..errors import ProtocolError, StallError, UmttError, format_ns
from .client import Client
from .core import StopReason
from .engine import Calendar
from .trace import Trace, TraceEvent

EXIT_STALLED = 3
DEFAULT_BUSY_POLL = 0.002
"""Measured with bench/kernels_vs_usfstl.py: waking from epoll_wait costs tens of
microseconds per message in a VM, and a guest's next message mostly comes within 2 ms;
0, 0.5, 2 and 5 ms gave ratios to usfstl of 1.20, 1.01, 0.89 and 0.84 (shm mode)."""
EXIT_SIGNALLED = 128


class PrintingTrace(Trace):
    """A trace that prints each event as it happens (``--debug=2``) without keeping it."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def add(self, event: TraceEvent) -> None:
        text = f"{format_ns(event.now)} {event.kind:7} {event.client}"
        if event.op:
            text += f" {event.op}(seq={event.seq}, time={event.time})"
        if event.detail:
            text += f" {event.detail}"
        print(text, file=self._stream, flush=True)


class EventTrace(Trace):
    """A trace that prints joins, drops and protocol errors only (``--debug=1``)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream

    def add(self, event: TraceEvent) -> None:
        if event.kind in ("join", "mode", "drop"):
            print(f"{format_ns(event.now)} {event.kind} {event.client} {event.detail}",
                  file=self._stream, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="umtt-controller",
        description="Time-travel controller (calendar) for UML time-travel=ext clients.",
    )
    parser.add_argument("--time", "-t", required=True, metavar="SOCKET",
                        help="Unix socket to listen on for the time protocol")
    parser.add_argument("--clients", "-c", type=_non_negative, default=0, metavar="N",
                        help="wait for N STARTs before acknowledging any (default 0)")
    parser.add_argument("--no-shm", action="store_true",
                        help="serve every client over messages, no shared memory")
    parser.add_argument("--time-at-start", type=_non_negative, default=0, metavar="NS",
                        help="what GET_TOD reports at virtual time 0, in ns")
    parser.add_argument("--debug", type=_non_negative, default=0, metavar="LEVEL",
                        help="0: errors only; 1: joins and drops; 2: every message")
    parser.add_argument("--late-joiners", choices=("shm", "messages"), default="shm",
                        help="how clients that join when the clock is not 0 are served "
                             "(default shm: their RUN and REQUEST messages in local time)")
    parser.add_argument("--busy-poll", type=float, default=DEFAULT_BUSY_POLL, metavar="SECONDS",
                        help="spin this long for a running client's next message before "
                             f"sleeping (default {DEFAULT_BUSY_POLL}; 0 = never spin)")
    parser.add_argument("--stall-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="give up when virtual time does not move for this long "
                             "(wall seconds; 0 = never)")
    return parser.parse_args(argv)


def _non_negative(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _make_trace(level: int, stream: TextIO) -> Trace | None:
    if level >= 2:
        return PrintingTrace(stream)
    if level == 1:
        return EventTrace(stream)
    return None


def serve(calendar: Calendar, stall_timeout: float, log: TextIO) -> int:
    """Serve clients until the last one leaves; the process exit status."""
    forever = float("inf")
    calendar.serve_until(lambda: calendar.starts_seen >= max(calendar.expected_clients, 1),
                         forever)
    noticed_at: int | None = None
    while True:
        stop = calendar.run_until(stall_timeout=stall_timeout or forever)
        if not calendar.live_clients():
            return 0
        if stop.reason is not StopReason.QUIESCENT:
            continue
        if noticed_at != calendar.now and all(c.started for c in calendar.live_clients()):
            noticed_at = calendar.now
            names = ", ".join(c.name for c in calendar.live_clients())
            print(f"umtt-controller: quiescent at {format_ns(calendar.now)}: every client "
                  f"waits with nothing scheduled ({names}); still serving", file=log,
                  flush=True)
        calendar.step(forever)  # whatever comes next: a request, a START, a departure


def _raise_on_signal(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(EXIT_SIGNALLED + signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``umtt-controller``."""
    args = parse_args(argv)
    log = sys.stderr
    signal.signal(signal.SIGTERM, _raise_on_signal)
    calendar = Calendar(
        shm=not args.no_shm,
        time_at_start=args.time_at_start,
        expected_clients=args.clients,
        pause_on_broadcast=False,
        trace=_make_trace(args.debug, log),
        log_fd=sys.stdout.fileno(),  # as usfstl does; clients may write to it
        busy_poll=args.busy_poll,
        late_joiners_shm=args.late_joiners == "shm",
    )

    def report_drop(_client: Client, error: ProtocolError | None) -> None:
        if error is not None:
            print(f"umtt-controller: dropped {error}", file=log, flush=True)

    calendar.on_drop.append(report_drop)
    try:
        with calendar:
            path = calendar.listen(args.time)
            if args.debug:
                print(f"umtt-controller: listening on {path}", file=log, flush=True)
            return serve(calendar, args.stall_timeout, log)
    except StallError as exc:
        print(f"umtt-controller: {exc}", file=log)
        return EXIT_STALLED
    except KeyboardInterrupt:
        return EXIT_SIGNALLED + signal.SIGINT
    except (UmttError, OSError) as exc:
        print(f"umtt-controller: {exc}", file=log)
        return 1

