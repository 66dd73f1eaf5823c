"""The calendar: a controller for UML's ``time-travel=ext`` protocol.

:class:`Calendar` is what its users see: the virtual time (:attr:`~Calendar.now`), the
run (:meth:`~Calendar.run_until`, :meth:`~Calendar.step`, :meth:`~Calendar.advance`),
in-process events on the shared clock (:meth:`~Calendar.call_at`), clients
(:meth:`~Calendar.listen`, :meth:`~Calendar.attach`) and other descriptors to serve
(:meth:`~Calendar.add_reader`). This module holds that surface and the run loop; the
protocol engine under it is in layers it inherits, each in its own module: the state,
sending and scheduling (:mod:`.core`), joining and leaving (:mod:`.membership`) and the
message handlers (:mod:`.handlers`), on the clock (:mod:`.clock`), the sockets
(:mod:`.reactor`, which knows nothing of the protocol), the shared memory (schedshm v2,
:mod:`.shm`) and the perturbation policy (:mod:`.perturb`). It never runs on its own:
the caller's thread drives it with :meth:`Calendar.run_until` (and friends), so
whatever the caller does between two calls happens at one virtual instant.

The design differs from the reference controller (usfstl, PROTOCOL.md §3) in one
structural way: it never waits for one client inside the handler of another. Every
outgoing message that expects an ACK is queued on its client with a continuation, and
a broadcast's ACK to its sender is deferred until every recipient has answered. That
removes usfstl's nested ``wait_for`` pitfalls (§6g) and lets any client misbehave at
any point without taking the others down.

Every send is non-blocking and buffered per client by the reactor (a client that stops
reading is dropped once its backlog passes a bound, instead of stalling everybody), and whether a
client uses shared memory is its own choice, read from its ``capa`` after the START
ACK (a kernel sets it before its first message, arch/um/kernel/time.c:103).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import NS_PER_S, StallError, WallBudgetError, format_ns
from ..wire import Op, SharedMemory
from .client import Client, start_order
from .clock import Clock, ScheduledCall
from .core import Stop, StopReason
from .handlers import Handlers

DEFAULT_STALL_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class WallBudget:
    """How slowly a run's virtual time may creep: once the run began (virtual
    ``started_ns``, :func:`time.monotonic` ``started``) ``patience`` wall seconds ago,
    it must have advanced ``min_rate`` virtual seconds per wall second.

    The stall detector sees only a clock that stands still. A kernel that spins with
    preemption off (LKDTM's SOFTLOCKUP) moves its clock by 1 ns per cpu_relax()
    (time_travel_ndelay(1), arch/x86/um/asm/processor.h), checks free_until at each
    step and publishes nothing: each probe makes it yield a few tens of virtual ms
    further on, which counts as progress, and its horizon is a deadline minutes of
    wall time away."""

    started_ns: int
    started: float
    patience: float
    min_rate: float


class Calendar(Handlers):
    """The virtual clock and scheduler that UML kernels and in-process jobs share.

    ``shm`` offers the shared-memory scheduler to clients (each decides to take it);
    ``expected_clients`` holds back every START ACK until that many STARTs arrived
    (usfstl's ``--clients``); ``time_at_start`` is what GET_TOD adds to the clock;
    ``log_fd`` is passed to every client in the START ACK (usfstl passes its stdout),
    and stays open: by default the calendar passes a descriptor of /dev/null it owns;
    ``late_joiners_shm`` offers the map to clients that join when the clock is not 0
    too (their messages stay in local time; off by default: such clients are served
    over messages); ``busy_poll`` (wall seconds) is how long to spin for a running
    client's next message before sleeping in epoll_wait: lower latency for more CPU;
    ``spin`` instead spins only for the WAIT of a run that must end at its first time
    step, as long as such runs have been short (:class:`~.spin.SpinPolicy`).
    ``tie_seed`` perturbs the run (:class:`~.perturb.Perturbation`): ties in a seeded
    order, and doorbells a seeded 0..``doorbell_latency`` ns late; ``decisions`` records
    each such choice and says which to apply (:class:`~.perturb.Decisions`).
    """

    # --- public surface -------------------------------------------------------------

    @property
    def now(self) -> int:
        """The virtual time in nanoseconds. While a shared-memory kernel runs, this is the
        time it has published in current_time (time.c:304), as far as the calendar let
        it run."""
        return self._sync_now()

    @property
    def clock(self) -> Clock:
        """The virtual clock and event queue (move it only through the calendar)."""
        return self._clock

    @property
    def runner(self) -> Client | None:
        """The client that holds the CPU right now, if any."""
        return self._runner

    @property
    def starts_seen(self) -> int:
        """How many clients have sent START so far."""
        return self._starts_seen

    @property
    def socket_path(self) -> Path | None:
        """Where :meth:`listen` listens, if it does."""
        return self._reactor.socket_path

    @property
    def shm(self) -> SharedMemory:
        """The shared-memory view (for inspection and tests)."""
        return self._map.view

    def __repr__(self) -> str:
        return f"<Calendar now={format_ns(self._clock.now)} clients={len(self.live_clients())}>"

    def __enter__(self) -> Calendar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reactor_stats(self) -> dict[str, float]:
        """How the calendar waited for I/O so far: ``sleeps`` in epoll_wait, waits
        answered while ``spun``, and the wall seconds from waking to the first write
        after it (``reaction_time`` over ``reactions``)."""
        reactor = self._reactor
        return {"sleeps": reactor.sleeps, "spun": reactor.spun,
                "reactions": reactor.reactions, "reaction_time": reactor.reaction_time}

    def listen(self, path: str | os.PathLike[str]) -> Path:
        """Listen for clients on a Unix socket at ``path``. A stale socket there (nobody
        accepts on it) is replaced; a live one raises SocketInUseError."""
        self._check_open()
        return self._reactor.listen(path)

    def attach(self, sock: socket.socket, label: str | None = None) -> Client:
        """Serve an already connected socket (one end of a socketpair, say) as a client."""
        self._check_open()
        client = Client(sock, next(self._serials), label)
        self.clients.append(client)
        return self._reactor.attach(client)

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable, while the calendar serves I/O.
        Consoles use this: a guest blocked on a full pipe must never stall the clock."""
        self._check_open()
        self._reactor.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (a no-op once the calendar is closed)."""
        if not self._closed:
            self._reactor.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Also call ``callback`` whenever ``fd`` (watched with :meth:`add_reader`) is
        writable, until :meth:`remove_writer`: devices queue replies a kernel does not
        take at once, and never block."""
        self._check_open()
        self._reactor.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        """Stop calling ``fd``'s writer (a no-op once the calendar is closed)."""
        if not self._closed:
            self._reactor.remove_writer(fd)

    def call_at(self, when: int, fn: Callable[[], object], name: str = "") -> ScheduledCall:
        """Run ``fn`` in-process at virtual time ``when`` (ns), on the shared clock."""
        call = self._clock.call_at(when, fn, name)
        self._pushed(when)
        return call

    def call_later(self, delay: int, fn: Callable[[], object], name: str = "") -> ScheduledCall:
        """Run ``fn`` ``delay`` nanoseconds from now."""
        return self.call_at(self._clock.now + delay, fn, name)

    def recall_runner(self, then: Callable[[], None] = lambda: None) -> None:
        """Make the running client (if any) yield at its next time step instead of
        free-running to its horizon, so the run loop looks at its condition again at
        this instant; ``then`` runs once the client knows. For a device a kernel just
        told something (at the instant it published when it notified: virtio_uml's
        vu_notify does, so the kernel is no further on): the device must hold its
        acknowledgement until ``then``, since a kernel served over messages may read the
        FREE_UNTIL only after it, and would run on (DESIGN.md fact 22)."""
        runner = self._runner
        if runner is None:
            then()
            return
        when = self._sync_now()
        self._horizon = min(self._horizon, when)
        if runner.shm:
            self._map.lower_free_until(when)
            then()
            return
        self._send_expecting_ack(runner, Op.FREE_UNTIL, when - runner.offset,
                                 lambda _ack: then())
        self._reactor.flush()

    def pause(self) -> None:
        """Stop the current run_until at the present instant (for use from callbacks)."""
        self._stops.append(Stop(StopReason.PAUSE, self._clock.now))

    def run_until(
        self,
        condition: Callable[[], bool] | None = None,
        *,
        deadline_ns: int | None = None,
        stall_timeout: float = DEFAULT_STALL_TIMEOUT,
        wall_budget: WallBudget | None = None,
    ) -> Stop:
        """Run the simulation until ``condition()`` holds, a doorbell or pause, the
        virtual instant ``deadline_ns`` (exact: nothing later runs and the clock ends on
        it), or quiescence (every client waits with nothing due). Raises StallError when
        virtual time does not move for ``stall_timeout`` wall seconds, and
        WallBudgetError when it moves, but slower than ``wall_budget`` allows.
        """
        self._check_open()
        if deadline_ns is not None and deadline_ns < self._clock.now:
            raise ValueError(f"deadline {format_ns(deadline_ns)} is before now "
                             f"({format_ns(self._clock.now)})")
        self._limit = deadline_ns
        try:
            return self._run(condition, deadline_ns, stall_timeout, wall_budget)
        finally:
            self._limit = None

    def advance(self, nanoseconds: int, *, stall_timeout: float = DEFAULT_STALL_TIMEOUT) -> Stop:
        """Run for exactly ``nanoseconds`` of virtual time unless something stops it first."""
        return self.run_until(deadline_ns=self._clock.now + nanoseconds,
                              stall_timeout=stall_timeout)

    def hold(self, reason: str) -> Callable[[], None]:
        """Keep the schedule at this instant, serving I/O, until the returned function
        is called. A device that interrupts a kernel needs this: the kernel answers and
        asks to run at the interrupt's instant, and the clock must not have moved on
        (it would be "a request in the past", DESIGN.md fact 21). A hold that is never
        released counts as a stall, named by ``reason``."""
        serial = next(self._hold_serials)
        self._holds[serial] = reason

        def release() -> None:
            self._holds.pop(serial, None)
        return release

    def serve_until(self, condition: Callable[[], bool], wall_timeout: float) -> bool:
        """Serve socket traffic without advancing the schedule until ``condition()``;
        False when ``wall_timeout`` wall seconds passed first. For things that happen
        outside virtual time: a process connecting, a START arriving."""
        self._check_open()
        give_up = time.monotonic() + wall_timeout
        while not condition():
            left = give_up - time.monotonic()
            if left <= 0:
                return False
            self._pump(left)
        return True

    def step(self, timeout: float = 0.0) -> bool:
        """Do one unit of work: serve I/O (waiting up to ``timeout``), or, when nobody
        runs, ack one START or dispatch one due event. True if anything happened."""
        self._check_open()
        if self._busy():
            return self._pump(timeout)
        return self._pump(0) or self._advance() or self._pump(timeout)

    def close(self) -> None:
        """Disconnect every client, stop listening, remove the socket, free the memory."""
        if self._closed:
            return
        self._reactor.flush()
        for client in self.live_clients():
            self._remove(client, None)
        self._reactor.close()
        self._map.close()
        if self._own_log_fd:
            os.close(self._log_fd)
        self._closed = True

    # --- the run loop ---------------------------------------------------------------

    def _run(self, condition: Callable[[], bool] | None, deadline: int | None,
             stall_timeout: float, wall_budget: WallBudget | None) -> Stop:
        last_progress = (self._clock.now, time.monotonic())
        # Poll often enough that the probe at half the budget comes before the end.
        wait = min(stall_timeout / 4, 1.0)
        while True:
            if not self._busy():
                stop = self._stop_if_done(condition)
                if stop is not None:
                    return stop
                if self._advance():
                    continue
                return self._idle_stop(deadline)
            # Console output or other traffic is no progress: only virtual time is.
            self._pump(wait)
            last_progress = self._check_stall(last_progress, stall_timeout)
            if wall_budget is not None:
                self._check_wall_budget(wall_budget)

    def _stop_if_done(self, condition: Callable[[], bool] | None) -> Stop | None:
        if self._stops:
            return self._stops.popleft()
        if condition is not None and condition():
            return Stop(StopReason.CONDITION, self._clock.now)
        return None

    def _idle_stop(self, deadline: int | None) -> Stop:
        if deadline is None:
            return Stop(StopReason.QUIESCENT, self._clock.now)
        self._set_now(deadline)
        return Stop(StopReason.DEADLINE, deadline)

    def _check_stall(self, last: tuple[int, float], budget: float) -> tuple[int, float]:
        vtime, since = last
        if vtime != self._sync_now():  # a shm runner that publishes its clock moves on
            return self._clock.now, time.monotonic()
        waited = time.monotonic() - since
        if waited >= budget:
            who = self._runner.name if self._runner else \
                "; ".join(self._holds.values()) or "acknowledgements or STARTs"
            raise StallError(self._clock.now, waited, who)
        if waited >= budget / 2:
            self._probe_runner()
        return last

    def _check_wall_budget(self, budget: WallBudget) -> None:
        wall = time.monotonic() - budget.started
        if wall < budget.patience:
            return
        advanced = self._clock.now - budget.started_ns
        if advanced < budget.min_rate * wall * NS_PER_S:
            who = self._runner.name if self._runner else \
                "; ".join(self._holds.values()) or "acknowledgements or STARTs"
            raise WallBudgetError(self._clock.now, advanced, wall, who)

    def _probe_runner(self) -> None:
        """A shm runner that has said nothing for half the stall budget may be working
        hard or spinning. Lowering its free_until makes a working kernel yield at its next
        time step (a RUN at the time it requests changes nothing in its timeline); a
        userspace busy loop takes no time steps and stays silent. Only silences this long
        are probed, so ordinary runs keep identical traces."""
        runner = self._runner
        if runner is not None and runner.shm:
            self._sync_now()
            if self._map.probe():
                self._record("probe", runner)

    def _busy(self) -> bool:
        """True while the schedule cannot move: a client runs, a broadcast or a lowered
        horizon is still being acknowledged, or STARTs are held until
        ``expected_clients`` arrived."""
        gated = bool(self._starting) and self._starts_seen < self.expected_clients
        return (self._runner is not None or bool(self._broadcasts) or self._held_acks > 0
                or gated or bool(self._holds))

    def _advance(self) -> bool:
        """At top level (nobody runs): ack a START, or dispatch the next due event."""
        try:
            return self._dispatch_next()
        finally:
            self._reactor.flush()

    def _dispatch_next(self) -> bool:
        if self._starting and self._starts_seen >= self.expected_clients:
            self._process_start(min(self._starting, key=start_order))
            return True
        job = self._clock.pop_due(self._limit)
        if job is None:
            return False
        owner = job.owner
        if isinstance(owner, Client):
            self._clock.move_to(job.time)  # published by the grant
            owner.job = None
            self._grant(owner)
            return True
        self._set_now(job.time)
        if isinstance(owner, ScheduledCall):
            owner._job = None
            self._record("call", None, detail=owner.name)
            self._map.end_run()
            owner.fn()
        return True

    # --- waiting for I/O -------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for socket events and handle them all; spin first for
        a running client's next message (``busy_poll``)."""
        if self._runner is None:
            return self._reactor.pump(timeout)
        if self._short_run_began:
            assert self.spin is not None
            return self._reactor.pump(timeout, max(self.busy_poll, self.spin.budget()))
        return self._reactor.pump(timeout, self.busy_poll)
