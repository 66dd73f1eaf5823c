"""pytest-umtt: test Linux kernels and drivers in virtual time.

User-Mode Linux kernels run under ``time-travel=ext`` against a calendar that lives in
the test process. Layers, each usable without pytest: :mod:`~pytest_umtt.wire` (the
protocol's data), :class:`Calendar` (the controller), :class:`Machine` and
:class:`Simulation` (kernels on one clock), :mod:`~pytest_umtt.kernel` (the builder).
"""

from .console import ConsoleLine
from .controller import (
    Calendar,
    Client,
    ClientState,
    ScheduledCall,
    Stop,
    StopReason,
    Trace,
    TraceEvent,
)
from .errors import (
    BootError,
    CommandTimeout,
    ExpectTimeout,
    MachineCrashed,
    MachineError,
    MachineStalled,
    ProtocolError,
    StallError,
    UmttError,
    format_ns,
)
from .machine import BackgroundCommand, CommandResult, ConsoleMatch, Machine, MachineState
from .simulation import MachineFactory, Simulation

__all__ = [
    "BackgroundCommand",
    "BootError",
    "Calendar",
    "Client",
    "ClientState",
    "CommandResult",
    "CommandTimeout",
    "ConsoleLine",
    "ConsoleMatch",
    "ExpectTimeout",
    "Machine",
    "MachineCrashed",
    "MachineError",
    "MachineFactory",
    "MachineStalled",
    "MachineState",
    "ProtocolError",
    "ScheduledCall",
    "Simulation",
    "StallError",
    "Stop",
    "StopReason",
    "Trace",
    "TraceEvent",
    "UmttError",
    "format_ns",
]
