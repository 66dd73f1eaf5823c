"""The calendar: a controller for UML's ``time-travel=ext`` protocol.

It owns the virtual clock and the queue of every participant's next event
(:mod:`.clock`), the sockets (:mod:`.reactor`, which knows nothing of the protocol),
the shared memory (schedshm v2, :mod:`.shm`) and the perturbation policy
(:mod:`.perturb`); this module is the protocol engine on top of them. It never runs on
its own: the caller's thread drives it with :meth:`Calendar.run_until` (and friends),
so whatever the caller does between two calls happens at one virtual instant.

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

import enum
import functools
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import (
    NS_PER_S,
    CalendarClosedError,
    ProtocolError,
    StallError,
    WallBudgetError,
    format_ns,
)
from ..wire import (
    FREE_RUN_SPAN,
    MESSAGE_SIZE,
    NO_ID,
    S64_MAX,
    START_ACK_ID_MASK,
    U64_MAX,
    Message,
    Op,
    SharedMemory,
    op_name,
    pack_message,
)
from .client import Broadcast, Client, ClientState, PendingAck, start_order
from .clock import Clock, Job, ScheduledCall
from .perturb import Decisions, Perturbation
from .reactor import Reactor
from .shm import ScheduleMap
from .spin import SpinPolicy
from .trace import Trace

DEFAULT_SHM_CLIENTS = 63
"""Clients served over shared memory; the map has one more entry, the controller's (§2)."""

MAX_CLIENT_ID = START_ACK_ID_MASK
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


class StopReason(enum.Enum):
    """Why :meth:`Calendar.run_until` returned."""

    CONDITION = "condition"
    DEADLINE = "deadline"
    QUIESCENT = "quiescent"
    DOORBELL = "doorbell"
    PAUSE = "pause"


@dataclass(frozen=True, slots=True)
class Stop:
    """The outcome of a run: why it stopped, when, and for a doorbell who rang it."""

    reason: StopReason
    time: int
    client: Client | None = None
    value: int | None = None


class Calendar:
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

    def __init__(
        self,
        *,
        shm: bool = True,
        shm_clients: int = DEFAULT_SHM_CLIENTS,
        time_at_start: int = 0,
        expected_clients: int = 0,
        pause_on_broadcast: bool = True,
        max_free_run: int | None = None,
        tie_seed: int | None = None,
        doorbell_latency: int = 0,
        trace: Trace | None = None,
        log_fd: int | None = None,
        busy_poll: float = 0.0,
        late_joiners_shm: bool = False,
        decisions: Decisions | None = None,
        spin: SpinPolicy | None = None,
    ) -> None:
        self.busy_poll = busy_poll
        self.spin = spin
        self.max_free_run = max_free_run
        self.time_at_start = time_at_start
        self.pause_on_broadcast = pause_on_broadcast
        self.trace = trace
        self.expected_clients = expected_clients
        self.shm_enabled = shm
        self.late_joiners_shm = late_joiners_shm
        # The public record of the run: clients, errors, counters and hooks.
        self.errors: list[ProtocolError] = []
        self.messages_received = 0
        self.messages_sent = 0
        self.runs = 0
        self.on_drop: list[Callable[[Client, ProtocolError | None], None]] = []
        self.on_broadcast: list[Callable[[Client, int], None]] = []
        self.on_wait: list[Callable[[Client], None]] = []
        self.clients: list[Client] = []
        self._reactor: Reactor[Client] = Reactor(
            on_frame=self._receive, on_close=self._disconnected, on_error=self._fail,
            on_accept=self.attach, frame_size=MESSAGE_SIZE)
        # Ties run first-in-first-out, or in a seeded shuffled order when asked to (to
        # shake out races between machines that happen to share an instant).
        self.perturbation = None if tie_seed is None \
            else Perturbation(tie_seed, doorbell_latency, decisions)
        self._clock = Clock() if self.perturbation is None else Clock(
            ties=self.perturbation.ties, judge=self.perturbation.keeps_tie_order)
        # Who starts, who runs and until when, and what is still owed.
        self._delayed_doorbells: list[tuple[Client, int, int]] = []  # with the ring's time
        self._serials = itertools.count(1)
        self._seq = itertools.count(1)
        self._starting: list[Client] = []
        self._held_acks = 0  # requesters' ACKs held for a runner's FREE_UNTIL ACK
        self._starts_seen = 0
        self._runner: Client | None = None
        self._short_run_began = 0.0  # wall time a run that ends at its first step began
        self._horizon = U64_MAX
        self._limit: int | None = None
        self._broadcasts: list[Broadcast] = []
        self._stops: deque[Stop] = deque()
        self._holds: dict[int, str] = {}
        self._hold_serials = itertools.count(1)
        self._closed = False
        self._map: ScheduleMap[Client] = ScheduleMap(self._clock, shm_clients + 1)
        self._own_log_fd = log_fd is None
        self._log_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC) if log_fd is None \
            else log_fd
        self._handlers = self._handler_table()

    def _handler_table(self) -> dict[int, Callable[[Client, Message], None]]:
        """Keyed by int: an IntEnum hashes like its value, and unknown ops must be looked up."""
        return {
            Op.ACK: self._on_ack,
            Op.START: self._on_start,
            Op.REQUEST: self._on_request,
            Op.WAIT: self._on_wait,
            Op.GET: self._on_get,
            Op.UPDATE: self._on_update,
            Op.RUN: self._on_controller_op,
            Op.FREE_UNTIL: self._on_controller_op,
            Op.GET_TOD: self._on_get_tod,
            Op.BROADCAST: self._on_broadcast,
        }

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

    def live_clients(self) -> list[Client]:
        """Clients that have not left."""
        return [c for c in self.clients if c.state is not ClientState.GONE]

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
        while True:
            if not self._busy():
                stop = self._stop_if_done(condition)
                if stop is not None:
                    return stop
                if self._advance():
                    continue
                return self._idle_stop(deadline)
            # Poll often enough that the probe at half the budget comes before the end.
            # Console output or other traffic is no progress: only virtual time is.
            self._pump(min(stall_timeout / 4, 1.0))
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
        self._set_now(job.time)
        owner = job.owner
        if isinstance(owner, Client):
            owner.job = None
            self._grant(owner)
        elif isinstance(owner, ScheduledCall):
            owner._job = None
            self._record("call", None, detail=owner.name)
            self._map.end_run()
            owner.fn()
        return True

    # --- I/O ------------------------------------------------------------------------

    def _pump(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for socket events and handle them all; spin first for
        a running client's next message (``busy_poll``)."""
        if self._runner is None:
            return self._reactor.pump(timeout)
        if self._short_run_began:
            assert self.spin is not None
            return self._reactor.pump(timeout, max(self.busy_poll, self.spin.budget()))
        return self._reactor.pump(timeout, self.busy_poll)

    def _receive(self, client: Client, data: bytes) -> None:
        """A message from ``client`` (the reactor reads one per read)."""
        message = Message.unpack(data)
        self.messages_received += 1
        if client.capa_pending:
            self._read_capa(client)
        if self.trace is not None and message.op not in _RECORDED_LATER:
            self._record("rx", client, message)
        handler = self._handlers.get(message.op)
        if handler is None:
            # usfstl ACKs unknown ops with time 0 (§1, scenario 27); so do we.
            self._send(client, Message(Op.ACK, message.seq, 0))
            return
        handler(client, message)

    def _send(self, client: Client, message: Message,
              then: Callable[[Message | None], None] | None = None,
              fds: list[int] | None = None) -> None:
        """Queue a message; if ``then`` is given, an ACK is expected and ``then`` runs on it.

        Messages go out at the end of the step that made them (the reactor's flush), in order,
        and consecutive ones to one client in a single write: ACK(WAIT), FREE_UNTIL and
        RUN to a kernel cost one syscall and one wake-up instead of three. Writes never
        block: what a client does not take stays queued, up to MAX_BACKLOG."""
        if client.state is ClientState.GONE:
            return
        if then is not None:
            client.pending_acks.append(PendingAck(message.seq, Op(message.op), then))
        if self.trace is not None:
            self._record("tx", client, message)
        self.messages_sent += 1
        if fds:
            self._send_with_fds(client, message, fds)
            return
        self._reactor.send(client, pack_message(message.op, message.seq, message.time & U64_MAX))

    def _send_with_fds(self, client: Client, message: Message, fds: list[int]) -> None:
        try:
            self._reactor.send_with_fds(client, message.pack(), fds)
        except OSError as exc:
            self._fail(client, f"write error: {exc.strerror or exc}", message)

    def _send_expecting_ack(self, client: Client, op: Op, value: int,
                            then: Callable[[Message | None], None] = lambda _: None) -> None:
        self._send(client, Message(op, next(self._seq), value), then)

    def _ack(self, client: Client, request: Message, value: int = 0) -> None:
        self._send(client, Message(Op.ACK, request.seq, value))

    # --- message handlers (§3 "Messages arriving while waiting") ---------------------

    def _on_start(self, client: Client, message: Message) -> None:
        if client.state is not ClientState.CONNECTED:
            self._fail(client, "START sent twice", message)
            return
        client.start_id = message.time
        client.start_seq = message.seq
        client.state = ClientState.STARTING
        self._starting.append(client)
        self._starts_seen += 1

    def _on_request(self, client: Client, message: Message) -> None:
        if not self._require_started(client, message):
            return
        when = _absolute(client, message.time)
        if when is not None and when < self._clock.now:
            self._fail(client, f"request for {format_ns(when)}, which is in the past", message)
            return
        if client.in_map:
            # Mirrored, so that a later collection sees this and not a stale entry.
            self._map.mirror_request(client.id, message.time + client.offset)
        runner = self._runner
        if runner is not None and runner.shm and client.in_map:
            # Picked up at the runner's WAIT with the requests written into shared memory,
            # in start order, as usfstl does; the runner only has to stop in time.
            if when is not None:
                self._map.lower_free_until(when)
            self._ack(client, message)
        elif runner is not None and not runner.shm and when is not None \
                and when < self._horizon:
            # The runner must know before the requester goes on: a kernel polling a
            # device socket (time.c:236-250) could otherwise run past this event.
            self._horizon = when
            self._held_acks += 1
            self._set_request(client, when)
            self._send_expecting_ack(runner, Op.FREE_UNTIL, when - runner.offset,
                                     functools.partial(self._release_ack, client, message))
        else:
            self._set_request(client, when)
            self._ack(client, message)

    def _release_ack(self, client: Client, request: Message, _ack: Message | None) -> None:
        """The runner ACKed its lowered horizon (or left): the requester may go on."""
        self._held_acks -= 1
        self._ack(client, request)

    def _on_wait(self, client: Client, message: Message) -> None:
        if client is self._runner:
            self._end_run(client, message)
        elif self._runner is None and client.started:
            if not client.shm:
                self._ack(client, message)
        else:
            self._fail(client, "WAIT from a client that is not running", message)

    def _on_get(self, client: Client, message: Message) -> None:
        if self._require_started(client, message):
            self._ack(client, message, self._sync_now() - client.offset)

    def _on_get_tod(self, client: Client, message: Message) -> None:
        # GET_TOD is absolute: no offset, even for late joiners (M:474, §2).
        if self._require_started(client, message):
            self._ack(client, message, self.time_at_start + self._sync_now())

    def _on_update(self, client: Client, message: Message) -> None:
        if client is not self._runner:
            self._fail(client, "UPDATE from a client that is not running", message)
            return
        new_time = message.time + client.offset
        problem = self._update_problem(new_time)
        if problem:
            self._fail(client, f"UPDATE {problem}", message)
            return
        self._set_now(new_time)
        self._ack(client, message)

    def _update_problem(self, new_time: int) -> str:
        """Why the runner may not say its clock is at ``new_time``, or "" if it may:
        it can neither go back nor pass what it was allowed to run to."""
        if new_time < self._sync_now():
            return f"goes backwards to {format_ns(new_time)}"
        nxt = self._clock.peek()
        if nxt is not None and new_time > nxt.time:
            return (f"to {format_ns(new_time)} passes the next event at "
                    f"{format_ns(nxt.time)}")
        if new_time > self._horizon:
            return f"to {format_ns(new_time)} passes its horizon at {format_ns(self._horizon)}"
        if self._limit is not None and new_time > self._limit:
            return (f"to {format_ns(new_time)} passes the end of the run at "
                    f"{format_ns(self._limit)}")
        return ""

    def _on_controller_op(self, client: Client, message: Message) -> None:
        self._fail(client, f"{op_name(message.op)} is the controller's to send", message)

    def _on_ack(self, client: Client, message: Message) -> None:
        if not client.pending_acks:
            self._fail(client, "ACK that answers nothing", message)
            return
        expected = client.pending_acks.popleft()
        if expected.op is not Op.BROADCAST:
            self._record("rx", client, message)
        if expected.seq != message.seq:
            self._fail(client, f"ACK with seq {message.seq}, expected {expected.seq} "
                               f"for {expected.op.name}", message)
            return
        if expected.then is not None:
            expected.then(message)

    def _on_broadcast(self, client: Client, message: Message) -> None:
        if not self._require_started(client, message):
            return
        self._sync_now()  # the doorbell rings at the instant the runner published
        value = message.time
        pending = Broadcast(client, message.seq, value)
        if self.pause_on_broadcast:
            self._ring_doorbell(client, value)
        for other in self.live_clients():
            if other is not client and other.started:
                pending.waiting.add(other)
                self._send_expecting_ack(other, Op.BROADCAST, value,
                                         functools.partial(self._broadcast_acked, pending, other))
        self._broadcasts.append(pending)
        self._maybe_finish_broadcast(pending)
        for hook in self.on_broadcast:
            hook(client, value)

    def _ring_doorbell(self, client: Client, value: int) -> None:
        """Make the ringing client yield at its very next time step (DESIGN.md fact 6).

        Under perturbation the pause comes a seeded 0..doorbell_latency ns later instead:
        it is then an in-process job, whose arrival lowers the runner's horizon like any
        other event, so the kernel yields exactly there."""
        perturbed = self.perturbation is not None and self.perturbation.delays_doorbells
        if client is self._runner:
            # Only the kernel's view shrinks: the calendar's horizon still bounds how far
            # the client may have run, which _end_run needs.
            self._tell_horizon(client, self._clock.now)
            if perturbed:
                # The ring's instant is known only once the kernel yields (it ran on since
                # it last told its time): the delay counts from there (_end_run).
                self._delayed_doorbells.append((client, value, self._clock.now))
                return
        if perturbed:
            self._delay_doorbell(client, value, self._clock.now)
            return
        self._stops.append(Stop(StopReason.DOORBELL, self._clock.now, client, value))

    def _delay_doorbell(self, client: Client, value: int, rung_at: int) -> None:
        """Pause a seeded delay from now; a reverted decision pauses as an unperturbed
        run does (the delay is drawn all the same, so later ones keep theirs)."""
        assert self.perturbation is not None
        delay = self.perturbation.doorbell_delay()
        if not self.perturbation.decisions.decide("doorbell", client.name, self._clock.now,
                                                  delay):
            self._stops.append(Stop(StopReason.DOORBELL, rung_at, client, value))
            return
        self.call_at(self._clock.now + delay, lambda: self._stops.append(
            Stop(StopReason.DOORBELL, self._clock.now, client, value)), "doorbell")

    def _release_delayed_doorbells(self, client: Client) -> None:
        if not self._delayed_doorbells:
            return
        rung = [(value, at) for owner, value, at in self._delayed_doorbells if owner is client]
        self._delayed_doorbells = [d for d in self._delayed_doorbells if d[0] is not client]
        for value, at in rung:
            self._delay_doorbell(client, value, at)

    def _broadcast_acked(self, pending: Broadcast, recipient: Client,
                         _ack: Message | None = None) -> None:
        pending.waiting.discard(recipient)
        self._maybe_finish_broadcast(pending)

    def _maybe_finish_broadcast(self, pending: Broadcast) -> None:
        if pending.waiting or pending not in self._broadcasts:
            return
        self._broadcasts.remove(pending)
        self._record("bcast-acked", pending.sender, time=pending.value)
        self._send(pending.sender, Message(Op.ACK, pending.seq, 0))

    def _require_started(self, client: Client, message: Message) -> bool:
        if client.started:
            return True
        self._fail(client, f"{op_name(message.op)} before START was acknowledged", message)
        return False

    # --- scheduling ---------------------------------------------------------------

    def _set_request(self, client: Client, when: int | None) -> None:
        """Queue ``client`` at absolute time ``when``; None, or S64_MAX and beyond, is "no
        request": the idle kernel's "sleep forever" (K:600-612), never to be granted, as a
        RUN there panics it (time.c:55-56). Callers check for the past."""
        if when is None or when >= S64_MAX:
            self._unqueue(client)
            return
        if client.job is not None and not client.job.cancelled and client.job.time == when:
            return  # already queued there: keep its place among ties
        self._unqueue(client)
        client.job = self._push(when, client)

    def _unqueue(self, client: Client) -> None:
        if client.job is not None:
            client.job.cancelled = True
            client.job = None

    def _push(self, when: int, owner: Client) -> Job:
        job = self._clock.schedule(when, owner)
        self._pushed(when)
        return job

    def _pushed(self, when: int) -> None:
        """Something was queued at ``when``: the runner may have to stop earlier."""
        if self._runner is not None and when < self._horizon:
            self._lower_horizon(when)

    def _collect_shm_requests(self) -> None:
        """Pick up requests written into shared memory (time.c:284-288), by kernels or
        mirrored from REQUEST messages, in start order.

        Called when a runner WAITs: requests are only written there while a shm client
        runs (running_id names no shm client otherwise, so everyone uses messages), and
        the runner itself is WAITING by then, so nothing written can be missed."""
        for client, when in self._map.written_requests(ClientState.WAITING):
            if when < self._clock.now:
                self._fail(client, f"request for {format_ns(when)} in shared memory, "
                                   f"which is in the past")
            else:
                self._set_request(client, when)

    def _next_horizon(self) -> int:
        """How far a client may free-run: the next event, bounded by the run's deadline."""
        span = FREE_RUN_SPAN if self.max_free_run is None else self.max_free_run
        horizon = min(self._clock.now + span, U64_MAX)
        job = self._clock.peek()
        if job is not None:
            horizon = min(horizon, job.time)
        if self._limit is not None:
            horizon = min(horizon, self._limit + 1)
        return horizon

    def _lower_horizon(self, when: int) -> None:
        """A new event before the runner's horizon: tell the runner before anyone else
        learns of it (the invariant of §3, scenario 13)."""
        assert self._runner is not None
        self._horizon = min(self._horizon, when)
        self._tell_horizon(self._runner, when)

    def _tell_horizon(self, runner: Client, when: int) -> None:
        if runner.shm:
            self._map.lower_free_until(when)
        else:
            self._send_expecting_ack(runner, Op.FREE_UNTIL, when - runner.offset)

    def _grant(self, client: Client) -> None:
        """RUN ``client`` now (§3 run_client)."""
        self._begin_run(client)
        if not client.shm:
            if client.in_map:
                # Its request may have been mirrored into shared memory; a kernel clears
                # REQ_RUN itself on RUN, a message client cannot (M:693-695).
                self._map.clear_request(client.id)
            self._send_expecting_ack(client, Op.FREE_UNTIL, self._horizon - client.offset)
        run = Message(Op.RUN, next(self._seq), self._clock.now - client.offset)
        # A shm client does not ACK RUN (K:158-167).
        self._send(client, run, None if client.shm else _ignore_ack)

    def _begin_run(self, client: Client, horizon: int | None = None) -> None:
        client.state = ClientState.RUNNING
        self._horizon = self._next_horizon() if horizon is None else horizon
        self._runner = client
        self.runs += 1
        if self.spin is not None:
            self._short_run_began = time.perf_counter() if self._horizon <= self._clock.now \
                else 0.0
        self._map.begin_run(client, client.in_map, self._horizon)
        if self.trace is not None:
            self._record("run", client, time=self._clock.now)

    def _end_run(self, client: Client, message: Message) -> None:
        if self._short_run_began:
            assert self.spin is not None
            self.spin.ran(time.perf_counter() - self._short_run_began)
            self._short_run_began = 0.0
        if client.shm:
            self._sync_now()
        self._runner = None
        client.state = ClientState.WAITING
        self._map.end_run()
        if not client.shm:
            self._ack(client, message)
        self._collect_shm_requests()
        self._move_to_safe_instant()
        self._release_delayed_doorbells(client)
        for hook in self.on_wait:
            hook(client)

    def _move_to_safe_instant(self) -> None:
        """A shm client free-ran without publishing its clock; the latest instant that is
        safe to call "now" is the earlier of its next event and its horizon (fact 7)."""
        if self._starting:
            # STARTs that came in while it ran join at the instant it reached: that is how
            # several shm kernels boot together at t=0 (§6a).
            return
        job = self._clock.peek()
        safe = min(self._horizon, job.time if job else U64_MAX)
        if self._limit is not None:
            safe = min(safe, self._limit)
        # With nothing due, no deadline and a bounded free run, the kernel may still have
        # run its own timers up to the horizon: a device must not interrupt it earlier.
        if job is not None or self._limit is not None or self.max_free_run is not None:
            self._set_now(max(self._clock.now, safe))

    def _sync_now(self) -> int:
        """Now, as far as a running shm kernel published it (§7.3, :meth:`.ScheduleMap.sync`)."""
        return self._map.sync(self._runner, self._limit)

    def _set_now(self, when: int) -> None:
        self._clock.move_to(when)
        runner = self._runner
        if runner is None or not runner.shm:
            self._map.publish()

    # --- joining ------------------------------------------------------------------

    def _process_start(self, client: Client) -> None:
        """ACK a START; the client then runs until its first WAIT (§3 process_starting_client)."""
        self._starting.remove(client)
        self._record("rx", client, Message(Op.START, client.start_seq, client.start_id or 0))
        client.offset = self._clock.now
        client.id = self._free_id()
        if client.id == 0:
            self._fail(client, f"no free client id (limit {MAX_CLIENT_ID})")
            return
        client.in_map = self._map.has_entry(client.id)
        client.capa_pending = client.in_map and self._map.can_offer(
            enabled=self.shm_enabled, late_joiners=self.late_joiners_shm)
        if client.in_map:
            self._map.join(client, 0 if client.start_id == NO_ID else (client.start_id or 0))
        # No free run for a joiner: it yields at its first time step, so clients that
        # start together run together, and a late joiner cannot run past a pending
        # event (usfstl 963e035, §6d).
        self._begin_run(client, horizon=self._clock.now)
        self._record("join", client, detail="offered shm" if client.capa_pending
                     else "over messages")
        fds = [self._map.fd if client.capa_pending else self._map.decoy_fd, self._log_fd]
        self._send(client, Message(Op.ACK, client.start_seq, client.id & START_ACK_ID_MASK),
                   fds=fds)

    def _read_capa(self, client: Client) -> None:
        """Its first message after the START ACK: a kernel sets capa before it sends
        anything (time.c:103), so capa now says whether it took the map."""
        client.capa_pending = False
        client.shm = self._map.took_map(client.id)
        self._record("mode", client, detail="uses shm" if client.shm
                     else "declined shm: over messages")

    def _free_id(self) -> int:
        used = {c.id for c in self.clients if c.id and c.state is not ClientState.GONE}
        for candidate in range(1, MAX_CLIENT_ID + 1):
            if candidate not in used:
                return candidate
        return 0

    # --- leaving ------------------------------------------------------------------

    def _fail(self, client: Client, detail: str, message: Message | None = None) -> None:
        error = ProtocolError(client.name, detail, self._clock.now,
                              str(message) if message else None)
        client.error = error
        self.errors.append(error)
        self._remove(client, error)

    def _disconnected(self, client: Client) -> None:
        self._remove(client, None)

    def _remove(self, client: Client, error: ProtocolError | None) -> None:
        """Drop a client: no trace of it remains in the schedule (§3 Removal)."""
        if client.state is ClientState.GONE:
            return
        self._record("drop", client, detail=str(error) if error else "disconnected")
        client.state = ClientState.GONE
        self._reactor.discard(client)
        self._unqueue(client)
        if client in self._starting:
            self._starting.remove(client)
        self._map.leave(client)
        if client is self._runner:
            self._runner = None
            self._map.end_run()
            # What others wrote into shared memory while it ran is collected at a WAIT
            # that now never comes.
            self._collect_shm_requests()
        for pending in list(self._broadcasts):
            if pending.sender is client:
                self._broadcasts.remove(pending)
        # What waited for its ACKs goes on: broadcasts, held requesters.
        while client.pending_acks:
            owed = client.pending_acks.popleft()
            if owed.then is not None:
                owed.then(None)
        for hook in self.on_drop:
            hook(client, error)

    # --- helpers ------------------------------------------------------------------

    def _record(self, kind: str, client: Client | None, message: Message | None = None,
                time: int = 0, detail: str = "") -> None:
        if self.trace is None:
            return
        name = client.name if client is not None else "calendar"
        if message is None:
            self.trace.record((self._clock.now, kind, name, "", 0, time, detail))
        else:
            self.trace.record((self._clock.now, kind, name, op_name(message.op),
                               message.seq, message.time, detail))

    def _check_open(self) -> None:
        if self._closed:
            raise CalendarClosedError("the calendar is closed")


# Recorded when handled rather than when read, because they arrive in host-timing order:
# STARTs from kernels booting side by side, ACKs from the recipients of a broadcast.
_RECORDED_LATER = frozenset((Op.START, Op.ACK))


def _absolute(client: Client, local: int) -> int | None:
    """A client's local request time on the shared clock; None for "no request"."""
    return None if local >= S64_MAX else local + client.offset


def _ignore_ack(_ack: Message | None) -> None:
    """The continuation of an ACK that only has to arrive (RUN, FREE_UNTIL)."""
