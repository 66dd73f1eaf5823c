"""The controller: a virtual clock, a socket reactor and the time-travel protocol engine.

Layers, bottom up, each importable without the ones above it:
:mod:`~pytest_umtt.controller.clock` (the event queue and the clock),
:mod:`~pytest_umtt.controller.shm` (the shared-memory map, no messages),
:mod:`~pytest_umtt.controller.reactor` (non-blocking sockets, framing, descriptors),
:mod:`~pytest_umtt.controller.spin` (when to spin for a kernel's WAIT),
:mod:`~pytest_umtt.controller.perturb` (seeded perturbation), then UML's
``time-travel=ext`` protocol on them: :mod:`~pytest_umtt.controller.client` (a
client and its state), then the layers the calendar inherits,
:mod:`~pytest_umtt.controller.core` (the state, sending, scheduling),
:mod:`~pytest_umtt.controller.membership` (joining, leaving),
:mod:`~pytest_umtt.controller.handlers` (the message handlers),
:mod:`~pytest_umtt.controller.engine` (:class:`Calendar`: the public surface and the
run loop), and :mod:`~pytest_umtt.controller.cli` (``umtt-controller``).
Device models can use the clock and the reactor without the protocol.
"""

from .client import Client, ClientState
from .clock import Clock, Job, ScheduledCall
from .core import Stop, StopReason
from .engine import Calendar, WallBudget
from .perturb import Decision, Decisions, Perturbation
from .reactor import Connection, Reactor
from .trace import Trace, TraceEvent

__all__ = [
    "Calendar",
    "Client",
    "ClientState",
    "Clock",
    "Connection",
    "Decision",
    "Decisions",
    "Job",
    "Perturbation",
    "Reactor",
    "ScheduledCall",
    "Stop",
    "StopReason",
    "Trace",
    "TraceEvent",
    "WallBudget",
]
