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
(:meth:`Placement.driving`): the test's own code and the processes it starts keep the
CPUs they had. :func:`choose_cpu` picks the CPU: an explicit one, or for ``auto`` a
pytest-xdist worker's by its number (two workers on two CPUs then never share one), and
otherwise the CPU the process runs on now (the scheduler's own choice of a free one).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

CpuSetting = int | Literal["auto"] | None
"""A simulation's CPU: that CPU, ``"auto"`` (:func:`choose_cpu`), or None: not placed
(the host scheduler decides, and the calendar spins briefly for quick replies)."""

_XDIST_WORKER = re.compile(r"^gw(\d+)$")


class PlacementError(ValueError):
    """A CPU that this process may not use."""


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on, ascending."""
    return sorted(os.sched_getaffinity(0))


def choose_cpu(setting: CpuSetting) -> int | None:
    """The CPU a simulation runs on for ``setting`` (None: not placed)."""
    if setting is None:
        return None
    allowed = allowed_cpus()
    if setting == "auto":
        worker = _XDIST_WORKER.match(os.environ.get("PYTEST_XDIST_WORKER", ""))
        if worker is not None:
            return allowed[int(worker.group(1)) % len(allowed)]
        current = current_cpu()
        return current if current in allowed else allowed[0]
    if setting not in allowed:
        raise PlacementError(f"CPU {setting} is not one this process may use "
                             f"(allowed: {', '.join(map(str, allowed))})")
    return setting


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

    def pin_child(self) -> None:
        """In a child before exec (a kernel): run on the simulation's CPU only."""
        if self.cpu is not None:
            os.sched_setaffinity(0, {self.cpu})

    @contextmanager
    def driving(self) -> Iterator[None]:
        """The calling thread on the simulation's CPU for the block, as it was after it
        (nested blocks pin and restore once)."""
        if self.cpu is None:
            yield
            return
        if self._depth == 0:
            self._before = os.sched_getaffinity(0)
            try:
                os.sched_setaffinity(0, {self.cpu})
            except OSError as exc:  # the CPU was taken away (a cpuset changed) since
                warnings.warn(f"simulation no longer placed on CPU {self.cpu}: {exc}; it "
                              f"runs unplaced (slower, not different)", stacklevel=3)
                self.cpu, self._before = None, None
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._before is not None:
                os.sched_setaffinity(0, self._before)
                self._before = None
