"""The calendar's core: its state, what it sends and records, and its schedule.

:class:`Core` holds every attribute of the calendar (all set in its ``__init__``): the
virtual clock and queue (:mod:`.clock`), the sockets (:mod:`.reactor`), the shared memory
(:mod:`.shm`), the perturbation policy (:mod:`.perturb`), the clients (:mod:`.client`)
and who runs until when. On it: sending (every message goes out through
:meth:`Core._send`, non-blocking and buffered per client by the reactor), the trace
record, and scheduling: queueing clients' requests, granting a run and bounding it with a
horizon, and moving the clock. Joining and leaving (:mod:`.membership`), the message
handlers (:mod:`.handlers`) and the public surface with the run loop (:mod:`.engine`)
are the layers above; what the core needs of them it declares abstract.
"""

from __future__ import annotations

import enum
import itertools
import os
import socket
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CalendarClosedError, ProtocolError, format_ns
from ..wire import (
    FREE_RUN_SPAN,
    MESSAGE_SIZE,
    S64_MAX,
    U64_MAX,
    Message,
    Op,
    op_name,
    pack_message,
)
from .client import Broadcast, Client, ClientState, PendingAck
from .clock import Clock, Job
from .perturb import Decisions, Perturbation
from .reactor import Reactor
from .shm import ScheduleMap
from .spin import SpinPolicy
from .trace import Trace

DEFAULT_SHM_CLIENTS = 63
"""Clients served over shared memory; the map has one more entry, the controller's (§2)."""


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


class Core(ABC):
    """The calendar's state and the machinery every layer above uses."""

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
        """Every attribute of the calendar, set here (the parameters: :class:`.Calendar`)."""
        self.busy_poll = busy_poll
        self.spin = spin
        self.max_free_run = max_free_run
        self.time_at_start = time_at_start
        self.pause_on_broadcast = pause_on_broadcast
        self._trace = trace
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
        self._trace_record = None if trace is None else trace.recorder()

    @property
    def trace(self) -> Trace | None:
        """The record of the run (None: not recorded); fixed at construction, since the
        hot path binds its recorder once."""
        return self._trace

    def live_clients(self) -> list[Client]:
        """Clients that have not left."""
        return [c for c in self.clients if c.state is not ClientState.GONE]

    # --- what the layers above provide ----------------------------------------------

    @abstractmethod
    def attach(self, sock: socket.socket, label: str | None = None) -> Client:
        """Serve a connected socket as a client (the reactor's newcomers come here)."""

    @abstractmethod
    def _handler_table(self) -> dict[int, Callable[[Client, Message], None]]:
        """Each op's handler (:mod:`.handlers`)."""

    @abstractmethod
    def _receive(self, client: Client, data: bytes) -> None:
        """A frame from ``client`` (:mod:`.handlers`)."""

    @abstractmethod
    def _fail(self, client: Client, detail: str, message: Message | None = None) -> None:
        """Drop ``client`` for a protocol error (:mod:`.membership`)."""

    @abstractmethod
    def _disconnected(self, client: Client) -> None:
        """``client`` closed its socket (:mod:`.membership`)."""

    # --- sending and recording -----------------------------------------------------

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
        if self._trace_record is not None:
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

    def _record(self, kind: str, client: Client | None, message: Message | None = None,
                time: int = 0, detail: str = "") -> None:
        record = self._trace_record
        if record is None:
            return
        name = client.name if client is not None else "calendar"
        if message is None:
            record((self._clock.now, kind, name, "", 0, time, detail))
        else:
            record((self._clock.now, kind, name, op_name(message.op), message.seq,
                    message.time, detail))

    def _check_open(self) -> None:
        if self._closed:
            raise CalendarClosedError("the calendar is closed")

    # --- scheduling ----------------------------------------------------------------

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
        # Comparisons rather than min() for the next event and the deadline: this runs
        # at every grant.
        span = FREE_RUN_SPAN if self.max_free_run is None else self.max_free_run
        horizon = min(self._clock.now + span, U64_MAX)
        job = self._clock.peek()
        if job is not None and job.time < horizon:
            horizon = job.time
        limit = self._limit
        if limit is not None and limit < horizon:
            horizon = limit + 1
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
        if self._trace_record is not None:
            self._record("run", client, time=self._clock.now)

    def _sync_now(self) -> int:
        """Now, as far as a running shm kernel published it (§7.3, :meth:`.ScheduleMap.sync`)."""
        return self._map.sync(self._runner, self._limit)

    def _set_now(self, when: int) -> None:
        self._clock.move_to(when)
        runner = self._runner
        if runner is None or not runner.shm:
            self._map.publish()


def _ignore_ack(_ack: Message | None) -> None:
    """The continuation of an ACK that only has to arrive (RUN, FREE_UNTIL)."""
