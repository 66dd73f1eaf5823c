"""The message handlers: what the calendar does with each message a client sends (§3
"Messages arriving while waiting"), a WAIT that ends a run, and the doorbells and
broadcasts. :class:`Handlers` is the layer on :class:`.membership.Membership`;
:meth:`Handlers._receive` decodes a frame and calls its op's handler, a bound method
looked up once in a table keyed by op (the hot path: WAIT, then RUN)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

from ..errors import format_ns
from ..wire import S64_MAX, Message, Op, op_name
from .client import Broadcast, Client, ClientState
from .core import Stop, StopReason
from .membership import Membership


class Handlers(Membership):
    """Each op's handler, and what a run's end, a doorbell and a broadcast set off."""

    # --- dispatch ------------------------------------------------------------------

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

    def _receive(self, client: Client, data: bytes) -> None:
        """A message from ``client`` (the reactor reads one per read)."""
        message = Message.unpack(data)
        self.messages_received += 1
        if client.capa_pending:
            self._read_capa(client)
        if self._trace_record is not None and message.op not in _RECORDED_LATER:
            self._record("rx", client, message)
        handler = self._handlers.get(message.op)
        if handler is None:
            # usfstl ACKs unknown ops with time 0 (§1, scenario 27); so do we.
            self._send(client, Message(Op.ACK, message.seq, 0))
            return
        handler(client, message)

    # --- message handlers ----------------------------------------------------------

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
        limit = self._limit
        safe = self._horizon  # comparisons rather than min(): this runs at every WAIT
        if job is not None and job.time < safe:
            safe = job.time
        if limit is not None and limit < safe:
            safe = limit
        # With nothing due, no deadline and a bounded free run, the kernel may still have
        # run its own timers up to the horizon: a device must not interrupt it earlier.
        if job is not None or limit is not None or self.max_free_run is not None:
            now = self._clock.now
            self._set_now(safe if safe > now else now)

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

    def _require_started(self, client: Client, message: Message) -> bool:
        if client.started:
            return True
        self._fail(client, f"{op_name(message.op)} before START was acknowledged", message)
        return False

    # --- doorbells and broadcasts --------------------------------------------------

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
        when = self._clock.now + delay
        self._clock.call_at(when, lambda: self._stops.append(
            Stop(StopReason.DOORBELL, self._clock.now, client, value)), "doorbell")
        self._pushed(when)

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


# Recorded when handled rather than when read, because they arrive in host-timing order:
# STARTs from kernels booting side by side, ACKs from the recipients of a broadcast.
_RECORDED_LATER = frozenset((Op.START, Op.ACK))


def _absolute(client: Client, local: int) -> int | None:
    """A client's local request time on the shared clock; None for "no request"."""
    return None if local >= S64_MAX else local + client.offset
