"""pytest-umtt: test Linux kernels and drivers in virtual time.

User-Mode Linux kernels run under ``time-travel=ext`` against a calendar that lives in
the test process. This package exports what a test or a script uses: a
:class:`Simulation` (the clock, and machines on it), :class:`Machine` and its results,
the kernel reports it survived (:class:`Splat`), and the errors. The layers below have
their own modules, each usable without pytest:
:mod:`~pytest_umtt.wire` (the protocol's data), :mod:`~pytest_umtt.controller` (the
calendar: clock, reactor, protocol engine, ``umtt-controller``),
:mod:`~pytest_umtt.uml`, :mod:`~pytest_umtt.kernel` (the builder),
:mod:`~pytest_umtt.rootfs` (the pinned guest root), :mod:`~pytest_umtt.signature` (a
kernel report's signature) and :mod:`~pytest_umtt.plugin`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BootError,
    BudgetSpent,
    BundleError,
    CacheError,
    CalendarClosedError,
    ClockError,
    CommandTimeout,
    ConfinementError,
    DeviceError,
    DeviceNotServedError,
    ExpectTimeout,
    GuestMemoryError,
    KernelBuildError,
    KernelError,
    KillError,
    KselftestError,
    KselftestFailure,
    KunitFailure,
    MachineCrashed,
    MachineError,
    MachineStalled,
    ProtocolError,
    RootfsError,
    SocketInUseError,
    StallError,
    UmttError,
    VhostUserError,
    WallBudgetError,
    format_ns,
)
from .units import NS_PER_S, UnitChangedWarning, ns_to_seconds, seconds_to_ns

if TYPE_CHECKING:
    from .kconfig import KernelConfig
    from .simulation import Elapsed, MachineFactory, RunStop, Simulation
    from .uml.console import ConsoleLine
    from .uml.machine import (
        BackgroundCommand,
        CommandResult,
        ConsoleMatch,
        Machine,
        MachineState,
    )
    from .uml.splats import Splat

_LAZY = {
    "KernelConfig": "kconfig",
    "Elapsed": "simulation", "MachineFactory": "simulation", "RunStop": "simulation",
    "Simulation": "simulation",
    "ConsoleLine": "uml.console",
    "BackgroundCommand": "uml.machine", "CommandResult": "uml.machine",
    "ConsoleMatch": "uml.machine", "Machine": "uml.machine", "MachineState": "uml.machine",
    "Splat": "uml.splats",
}
"""Exports imported on first use, so that a tool using one layer (``umtt-trace`` reads
traces) does not load the machines, pexpect and psutil with the package."""


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "NS_PER_S",
    "BackgroundCommand",
    "BootError",
    "BudgetSpent",
    "BundleError",
    "CacheError",
    "CalendarClosedError",
    "ClockError",
    "CommandResult",
    "CommandTimeout",
    "ConfinementError",
    "ConsoleLine",
    "ConsoleMatch",
    "DeviceError",
    "DeviceNotServedError",
    "Elapsed",
    "ExpectTimeout",
    "GuestMemoryError",
    "KernelBuildError",
    "KernelConfig",
    "KernelError",
    "KillError",
    "KselftestError",
    "KselftestFailure",
    "KunitFailure",
    "Machine",
    "MachineCrashed",
    "MachineError",
    "MachineFactory",
    "MachineStalled",
    "MachineState",
    "ProtocolError",
    "RootfsError",
    "RunStop",
    "Simulation",
    "SocketInUseError",
    "Splat",
    "StallError",
    "UmttError",
    "UnitChangedWarning",
    "VhostUserError",
    "WallBudgetError",
    "format_ns",
    "ns_to_seconds",
    "seconds_to_ns",
]
