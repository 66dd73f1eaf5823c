"""Where a simulation runs: one host CPU for its calendar and all its kernels.

Under time travel one participant runs at a time: the calendar hands the CPU to a
kernel (RUN) and gets it back (WAIT), and inside a UML kernel its kernel process and the
userspace process it traces hand over to each other at every guest system call. Every
hand-over wakes a sleeping process. Spread over several CPUs, each wake-up crosses CPUs:
an inter-processor interrupt and the target's exit from idle, which on a virtual machine
is a VM exit or two. On one CPU the woken process simply runs next. Nothing runs in
parallel that could make up for it, so a simulation runs fastest on one CPU (measured in
docs/DESIGN.md, fact 33: 4 machines' wake-up loop 6.4 s spread, 3.6 s on one CPU; one
kernel's boot 0.42 s spread, 0.26 s on one CPU).

A :class:`Placement` pins the kernels (in the child, before exec: UML's helpers inherit
it) and the thread that drives the calendar, but that thread only while it drives it
(:meth:`Placement.driving`). What runs there runs pinned too: run conditions, doorbell
handlers, scheduled calls and device callbacks, and any thread or process they start
(:meth:`Placement.released` gives such a block its CPUs back). The test's own code
outside the run keeps the CPUs it had. :func:`choose_cpu` picks the CPU: an explicit
one, or for ``auto`` the CPU the process runs on now (the scheduler's own choice of a
free one). pytest-xdist workers no more numerous than the CPUs take one each, by their
number, so that two workers on two CPUs never share one; more workers than CPUs choose
as a lone process does, at each simulation, so that the last ones running are not
stuck on one CPU while another idles.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

CpuSetting = int | Literal["auto"] | None
"""A simulation's CPU: that CPU, ``"auto"`` (:func:`choose_cpu`), or None: not placed
(the host scheduler decides, and the calendar spins briefly for quick replies)."""

_XDIST_WORKER = re.compile(r"^gw(\d+)$")


class PlacementError(ValueError):
    """A CPU that this process may not use."""


class PlacementWarning(UserWarning):
    """A simulation could not keep its CPU and runs unplaced (slower, not different)."""


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def xdist_worker() -> int | None:
    """This process's pytest-xdist worker number, if it is one."""
    worker = _XDIST_WORKER.match(os.environ.get("PYTEST_XDIST_WORKER", ""))
    return None if worker is None else int(worker.group(1))


def xdist_workers() -> int:
    """How many pytest-xdist workers this run has (0 outside one)."""
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    return int(count) if count.isdigit() else 0


def choose_cpu(setting: CpuSetting) -> int | None:
    """The CPU a simulation runs on for ``setting`` (None: not placed). In a
    pytest-xdist worker, an explicit CPU is where worker 0 goes and worker N takes the
    Nth allowed CPU after it, in turn; so does ``auto`` from the first allowed CPU, as
    long as there are no more workers than CPUs."""
    if setting is None:
        return None
    allowed = allowed_cpus()
    worker = xdist_worker()
    if setting == "auto":
        if worker is not None and xdist_workers() <= len(allowed):
            return allowed[worker % len(allowed)]
        current = current_cpu()
        return current if current in allowed else allowed[0]
    check_cpu(setting, allowed)
    if worker is None:
        return setting
    return allowed[(allowed.index(setting) + worker) % len(allowed)]


def check_cpu(cpu: int, allowed: list[int] | None = None) -> int:
    """``cpu`` if this process may use it (one of ``allowed``, if the caller read them
    already), else PlacementError naming those it may."""
    allowed = allowed_cpus() if allowed is None else allowed
    if cpu not in allowed:
        raise PlacementError(f"CPU {cpu} is not one this process may use "
                             f"(allowed: {', '.join(map(str, allowed))})")
    return cpu


def current_cpu() -> int | None:
    """The CPU the calling thread ran on last (/proc/thread-self/stat field 39)."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[36])  # field 39; fields[0] is field 3 (state)


class Placement:
    """One CPU for a simulation's kernels and, while it drives the calendar, its thread;
    ``cpu`` None places nothing."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self._depth = 0
        self._before: set[int] | None = None

    def __repr__(self) -> str:
        return f"<Placement cpu={self.cpu}>"

    @contextlib.contextmanager
    def driving(self) -> Iterator[None]:
        """The calling thread on the simulation's CPU for the block, as it was after it
        (nested blocks pin and restore once)."""
        if self.cpu is not None and self._depth == 0:
            self._pin(self.cpu)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._before is not None:
                before, self._before = self._before, None
                with contextlib.suppress(OSError):  # some of them were taken away
                    os.sched_setaffinity(0, before)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Inside :meth:`driving` (a run's callback, say), the thread's CPUs from before
        the run for the block: for a host process or thread that should not share the
        simulation's CPU. Outside it, nothing changes."""
        before = self._before
        if before is None:
            yield
            return
        os.sched_setaffinity(0, before)
        try:
            yield
        finally:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})

    def _pin(self, cpu: int) -> None:
        before = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:  # the CPU was taken away (a cpuset changed) since
            self.cpu = None
            warnings.warn(f"simulation no longer placed on CPU {cpu}: {exc}; it runs "
                          f"unplaced (slower, not different)", PlacementWarning, stacklevel=4)
            return
        self._before = before
