"""Exceptions of pytest-umtt: one base class, subclasses that carry their context.

Every virtual instant an error carries is kept exact, as integer nanoseconds (``now_ns``),
and given in seconds under the bare name (``now``), as everywhere at the user API.
"""

from __future__ import annotations

from pathlib import Path

# Re-exported: callers take them from here too.
from .units import NS_PER_S as NS_PER_S  # noqa: PLC0414
from .units import format_ns as format_ns  # noqa: PLC0414


class UmttError(Exception):
    """Base class of every error pytest-umtt raises."""


class _AtVirtualTime:
    """An error raised at a virtual instant: ``now_ns`` exact, ``now`` in seconds."""

    now_ns: int

    @property
    def now(self) -> float:
        """When it happened, in virtual seconds."""
        return self.now_ns / NS_PER_S


class ProtocolError(_AtVirtualTime, UmttError):
    """A client broke the time-travel protocol; the calendar dropped it and went on."""

    def __init__(self, client: str, detail: str, now_ns: int,
                 message: str | None = None) -> None:
        self.client = client
        self.detail = detail
        self.now_ns = now_ns
        self.message = message
        where = f" on {message}" if message else ""
        super().__init__(f"{client}: {detail}{where} at virtual time {format_ns(now_ns)}")


class StallError(_AtVirtualTime, UmttError):
    """Virtual time did not move for longer than the wall-clock budget allowed."""

    def __init__(self, now_ns: int, waited: float, waiting_for: str) -> None:
        self.now_ns = now_ns
        self.waited = waited
        """Wall seconds it stood still."""
        self.waiting_for = waiting_for
        super().__init__(
            f"virtual time stalled at {format_ns(now_ns)} for {waited:.1f} s wall "
            f"(waiting for {waiting_for})"
        )


class WallBudgetError(StallError):
    """Virtual time moved, but so slowly that the run's wall budget ran out first: the
    guest creeps far slower than real time (a kernel spinning with preemption off)."""

    def __init__(self, now_ns: int, advanced_ns: int, wall: float, waiting_for: str) -> None:
        super().__init__(now_ns, wall, waiting_for)
        self.advanced_ns = advanced_ns
        """Virtual time the run advanced, as far as the calendar saw it."""
        self.args = (f"{creep_diagnosis(advanced_ns, wall)}, to {format_ns(now_ns)} "
                     f"(running: {waiting_for})",)


def creep_diagnosis(advanced_ns: int, wall: float) -> str:
    """What it means that ``advanced_ns`` of virtual time passed in ``wall`` seconds."""
    slower = f"{wall * NS_PER_S / advanced_ns:.0f}x slower than" if advanced_ns else "none of"
    return (f"virtual time advanced {advanced_ns / NS_PER_S:.3f} s in {wall:.1f} s of wall "
            f"time ({slower} real time): the kernel is spinning (a soft lockup?)")


class CalendarClosedError(UmttError):
    """The calendar was used after close()."""


class MachineError(_AtVirtualTime, UmttError):
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


class BootError(MachineError):
    """The kernel did not come up: it could not run, connect, or start its agent."""


class MachineCrashed(MachineError):
    """The kernel panicked, oopsed or hit a BUG, or its process died."""


class MachineStalled(MachineError):
    """The guest stopped virtual time from moving (a busy loop, say)."""


class CommandTimeout(MachineError):
    """A command did not finish within its virtual timeout: ``command``, its budget
    (``timeout`` seconds, ``timeout_ns`` exact) and what it had written when it was
    stopped (``stdout``, ``stderr``); ``now`` is when it was killed."""

    def __init__(self, machine: str, what: str, now_ns: int, console_tail: str = "",
                 log: str | None = None, *, command: str = "", timeout_ns: int = 0,
                 stdout: bytes = b"", stderr: bytes = b"") -> None:
        super().__init__(machine, what, now_ns, console_tail, log)
        self.command = command
        self.timeout_ns = timeout_ns
        self.stdout = stdout
        self.stderr = stderr

    @property
    def timeout(self) -> float:
        """The command's budget, in virtual seconds."""
        return self.timeout_ns / NS_PER_S


class ExpectTimeout(MachineError):
    """The console did not show the expected pattern within the virtual timeout."""


class DeviceError(_AtVirtualTime, UmttError):
    """A device model failed: the kernel broke the vhost-user protocol or its rings, or
    the model raised. Names the device (``machine/device``), what it was doing (the
    request, a kick, a timer) and when; the machine serving it is marked crashed."""

    def __init__(self, device: str, request: str, detail: str, now_ns: int) -> None:
        self.device = device
        self.request = request
        self.detail = detail
        self.now_ns = now_ns
        super().__init__(f"device {device}: {request}: {detail} (at virtual time "
                         f"{format_ns(now_ns)})")


class VhostUserError(UmttError):
    """The frontend broke the vhost-user protocol; the message names the device and the
    request."""


class GuestMemoryError(UmttError):
    """The frontend pointed at memory it did not share: a device bug or a broken guest."""


class DeviceNotServedError(UmttError):
    """A device model was asked for its clock or queues before a machine served it."""


class KillError(UmttError):
    """Host processes outlived SIGKILL (stuck in the kernel, say): ``pids``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        super().__init__(f"processes survived SIGKILL: {pids}")


class BudgetSpent(UmttError):
    """Delta debugging used up its run budget (``triage.ddmin`` stops there)."""


class KunitFailure(UmttError):
    """A KUnit case reported ``not ok`` (the item's failure; its report says how)."""


class KselftestFailure(UmttError):
    """A kselftest failed, crashed its kernel, or outran a budget (the item's failure)."""


class SocketInUseError(UmttError):
    """Another controller is listening on the socket path."""


class ClockError(_AtVirtualTime, UmttError):
    """A virtual clock was about to go backwards, from ``now`` to ``when``: a bug in
    whatever drives the clock (the calendar, or a device model on its own)."""

    def __init__(self, now_ns: int, when_ns: int) -> None:
        super().__init__(f"the clock would go backwards from {format_ns(now_ns)} "
                         f"to {format_ns(when_ns)}")
        self.now_ns = now_ns
        self.when_ns = when_ns

    @property
    def when(self) -> float:
        """The instant it was asked to go to, in virtual seconds."""
        return self.when_ns / NS_PER_S


class BundleError(UmttError):
    """A replay bundle cannot be written or replayed: the message names the bundle and
    the member (or file) that is wrong, and what to do."""


class ConfinementError(UmttError):
    """Machines were to be confined to their directories, and the host does not allow it."""


class CacheError(UmttError):
    """Preparing something in the cache (a kernel source, a kernel, the shim, the pinned
    root, kselftests) failed; the message says what, where, and what to run next."""


class KernelError(CacheError):
    """Building or checking a kernel failed; the message says what and where."""


class KernelBuildError(KernelError):
    """A build failed: carries the log path and its last lines."""

    def __init__(self, what: str, log: Path, tail: list[str]) -> None:
        self.log = log
        self.tail = tail
        lines = "\n".join(f"    {line}" for line in tail)
        super().__init__(f"{what}; full log: {log}\n  last lines:\n{lines}")


class RootfsError(KernelError):
    """Building the pinned root filesystem failed; the message says what and where."""


class KselftestError(CacheError):
    """A kselftest tree could not be built or read; the message says what and where."""
