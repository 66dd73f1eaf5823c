"""pytest-umtt: test Linux kernels and drivers in virtual time.

User-Mode Linux kernels run under ``time-travel=ext`` against a calendar that lives in
the test process; see :class:`pytest_umtt.calendar.Calendar`.
"""

from .calendar import Calendar, Client, ClientState, ScheduledCall, Stop, StopReason
from .errors import ProtocolError, StallError, UmttError, format_ns
from .trace import Trace, TraceEvent

__all__ = [
    "Calendar",
    "Client",
    "ClientState",
    "ProtocolError",
    "ScheduledCall",
    "StallError",
    "Stop",
    "StopReason",
    "Trace",
    "TraceEvent",
    "UmttError",
    "format_ns",
]
