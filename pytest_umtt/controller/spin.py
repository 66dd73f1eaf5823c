"""When the calendar should spin for a kernel's next message instead of sleeping.

A kernel granted a run whose horizon is its start (another participant is due at the
same instant, as when machines run in lockstep) yields at its very next time step:
its WAIT usually comes within tens of microseconds of wall time, sooner than a process
sleeping in epoll_wait is woken and scheduled again. Spinning through that wait saves
the wake-up on the critical path of every such round trip; spinning through a long run
only burns a core that a kernel (or another pytest worker) could use.

:class:`SpinPolicy` decides from what it measured: how long such short runs took (wall
time from the grant to the WAIT, a moving average). It spins only while that average is
within ``cap``, and then for at most twice the average; on a loaded host the runs take
longer, the average passes the cap and the calendar sleeps again. While it does not
spin it still measures, so it notices when the host is quiet again. Nothing here touches
virtual time: the order and content of every message are the same whether it spins or
not.
"""

from __future__ import annotations

import os

DEFAULT_SPIN_CAP = 100e-6
"""Wall seconds: the longest average short run the calendar spins for."""
SMOOTHING = 1 / 8
"""Weight of the newest short run in the moving average."""
INITIAL_ESTIMATE = 1.0
"""Before any measurement the average is far beyond any cap: no spin until measured."""


class SpinPolicy:
    """How long to spin for a short run's WAIT (:meth:`budget`), learnt from how long
    short runs took (:meth:`ran`). ``cap`` 0 never spins, and neither does a process
    allowed one CPU only (the kernel it waits for could not run while it spins)."""

    def __init__(self, cap: float = DEFAULT_SPIN_CAP, cpus: int | None = None) -> None:
        if cap < 0:
            raise ValueError(f"spin cap must be 0 or more wall seconds, got {cap!r}")
        cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
        self.cap = cap if cpus > 1 else 0.0
        self.average = INITIAL_ESTIMATE
        self.short_runs = 0

    def budget(self) -> float:
        """Wall seconds to spin for the WAIT of a short run that just began (0: sleep)."""
        average = self.average
        if average > self.cap or not self.cap:
            return 0.0
        return 2 * average

    def ran(self, wall: float) -> None:
        """A short run took ``wall`` seconds from its grant to its WAIT."""
        self.short_runs += 1
        if self.short_runs == 1:
            self.average = wall
        else:
            self.average += (wall - self.average) * SMOOTHING
