"""Random and malformed client streams against an in-process calendar.

A stream is a list of actions by a handful of clients on socketpairs: well-formed and
ill-formed messages with interesting times, raw bytes of any length, writes into shared
memory, ACKs, reads, departures and newcomers, and steps of the calendar. After every
action the calendar must still stand, and keep its invariants:

- its clock never goes back, and neither does ``current_time`` unless a client wrote it;
- ``running_id`` names the runner if its entry lies inside the map, and never an id
  beyond ``len``;
- at most one client runs;
- no client is sent a RUN at or beyond S64_MAX, or a RUN earlier than its last one.

Used by tests/test_fuzz.py (a short run) and bench/fuzz_calendar.py (minutes).
"""

from __future__ import annotations

import contextlib
import socket
from array import array
from dataclasses import dataclass, field

from hypothesis import strategies as st

from pytest_umtt import StallError
from pytest_umtt.controller import Calendar, Client, ClientState
from pytest_umtt.wire import MESSAGE_SIZE, NO_ID, S64_MAX, U64_MAX, Message, Op
from tests.refclient import RefClient

MAX_CLIENTS = 5
STEPS_PER_SETTLE = 200

times = st.one_of(
    st.sampled_from([0, 1, 255, 256, 1000, 10**9, S64_MAX - 1, S64_MAX, S64_MAX + 1,
                     U64_MAX - 1, U64_MAX]),
    st.integers(0, 10_000),
    st.integers(0, U64_MAX),
)
ops = st.one_of(st.sampled_from(list(Op)), st.integers(0, 2**32 - 1))
who = st.integers(0, MAX_CLIENTS - 1)

live = st.tuples(st.just("live"), who, st.sampled_from([0, 1, 256, 1000, 5000, S64_MAX]))
# Half the actions are a kernel going about its business, so streams get somewhere
# before the other half breaks things.
others = st.one_of(
    st.tuples(st.just("send"), who, ops, times, st.booleans()),
    st.tuples(st.just("kernel"), who, st.sampled_from(["start", "request", "wait", "get",
                                                       "update", "broadcast"]), times),
    st.tuples(st.just("raw"), who, st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("shm"), who, st.sampled_from(["capa", "flags", "req_time",
                                                    "free_until", "current_time"]), times),
    st.tuples(st.just("ack"), who),
    st.tuples(st.just("read"), who),
    st.tuples(st.just("close"), who),
    st.tuples(st.just("connect"), st.booleans()),
    st.tuples(st.just("run"), st.integers(0, 5000)),
)
actions = st.booleans().flatmap(lambda kernel_like: live if kernel_like else others)
streams = st.lists(actions, min_size=1, max_size=60)


class InvariantBroken(AssertionError):
    """The calendar broke one of the invariants in the module docstring."""


@dataclass
class FuzzClient:
    """The test's end of one connection, with what it was told."""

    ref: RefClient
    client: Client
    unacked: list[Message] = field(default_factory=list)
    last_run: int = -1
    closed: bool = False


class FuzzWorld:
    """One calendar, up to MAX_CLIENTS clients, and the invariants checked after each action."""

    def __init__(self, shm: bool, expected: int) -> None:
        self.calendar = Calendar(shm=shm, expected_clients=expected, pause_on_broadcast=False)
        self.clients: list[FuzzClient] = []
        self.now = 0
        self.current_time = 0
        self.actions = 0
        self.runs = 0

    def close(self) -> None:
        for fuzz in self.clients:
            fuzz.ref.close()
        self.calendar.close()

    def play(self, stream: list[tuple[object, ...]]) -> None:
        """Do every action of ``stream``, checking the invariants after each."""
        self.connect(True)
        for action in stream:
            self.do(action)
            self.settle()
            self.check()
            self.actions += 1

    # --- actions --------------------------------------------------------------------

    def do(self, action: tuple[object, ...]) -> None:
        kind, *args = action
        if kind == "connect":
            self.connect(bool(args[0]))
        elif kind == "run":
            self.run(int(args[0]))  # type: ignore[call-overload]
        else:
            fuzz = self.pick(int(args[0]))  # type: ignore[call-overload]
            if fuzz is not None:
                getattr(self, f"do_{kind}")(fuzz, *args[1:])

    def pick(self, index: int) -> FuzzClient | None:
        live = [f for f in self.clients if not f.closed]
        return live[index % len(live)] if live else None

    def connect(self, take_shm: bool) -> None:
        if len(self.clients) >= 2 * MAX_CLIENTS:
            return
        ours, theirs = socket.socketpair()
        ref = RefClient(theirs, timeout=0.0, take_shm=take_shm)
        theirs.setblocking(False)
        self.clients.append(FuzzClient(ref, self.calendar.attach(ours)))

    def run(self, span: int) -> None:
        # StallError: a client that holds the CPU and says nothing is not the calendar's fault.
        with contextlib.suppress(StallError):
            self.calendar.run_until(deadline_ns=self.calendar.now + span, stall_timeout=0.02)

    def do_send(self, fuzz: FuzzClient, op: int, time: int, own_seq: bool) -> None:
        seq = fuzz.ref.seq + 1 if own_seq else time & 0xFFFFFFFF
        fuzz.ref.seq += 1
        self.write(fuzz, Message(op, seq, time).pack())

    def do_kernel(self, fuzz: FuzzClient, what: str, time: int) -> None:
        """A well-formed message as a kernel would send it (no waiting for the answer)."""
        op = {"start": Op.START, "request": Op.REQUEST, "wait": Op.WAIT, "get": Op.GET,
              "update": Op.UPDATE, "broadcast": Op.BROADCAST}[what]
        if what == "start":
            time = time if time % 3 else NO_ID
        elif what in ("request", "update"):
            time = fuzz.ref.time + time % 5000
        fuzz.ref.seq += 1
        self.write(fuzz, Message(op, fuzz.ref.seq, time).pack())

    def do_live(self, fuzz: FuzzClient, delta: int) -> None:
        """Behave like a kernel for a moment: answer what came, then START if not yet
        started, or, when running, ask for ``delta`` later and WAIT (time.c:253-362)."""
        self.do_read(fuzz)
        while fuzz.unacked and not fuzz.closed:
            self.do_ack(fuzz)
        state = fuzz.client.state
        ref = fuzz.ref
        if state is ClientState.CONNECTED:
            ref.seq += 1
            self.write(fuzz, Message(Op.START, ref.seq, ref.seq).pack())
        elif state is ClientState.RUNNING and fuzz.client is self.calendar.runner:
            when = min(ref.time + delta, S64_MAX)
            shm = ref.shm
            if shm is not None and shm.entry(shm.running_id).capa:
                shm.entry(ref.id).post_request(when + ref.offset)
                shm.free_until = min(shm.free_until, when + ref.offset)
            else:
                ref.seq += 1
                self.write(fuzz, Message(Op.REQUEST, ref.seq, when).pack())
            ref.seq += 1
            self.write(fuzz, Message(Op.WAIT, ref.seq, U64_MAX).pack())

    def do_raw(self, fuzz: FuzzClient, data: bytes) -> None:
        self.write(fuzz, data)

    def do_shm(self, fuzz: FuzzClient, name: str, value: int) -> None:
        shm = fuzz.ref.shm
        if shm is None:
            return
        if name == "current_time":
            # Only the running kernel writes it (time.c:300-306); others would panic.
            if shm.running_id != fuzz.ref.id:
                return
            self.current_time = min(value, U64_MAX)
            shm.current_time = value
        elif name == "free_until":
            shm.free_until = min(shm.free_until, value)
        else:
            setattr(shm.entry(fuzz.ref.id), name, value)

    def do_ack(self, fuzz: FuzzClient) -> None:
        self.do_read(fuzz)
        if fuzz.unacked:
            message = fuzz.unacked.pop(0)
            self.write(fuzz, Message(Op.ACK, message.seq, 0).pack())

    def do_read(self, fuzz: FuzzClient) -> None:
        while not fuzz.closed:
            try:
                data, ancdata, _, _ = fuzz.ref.sock.recvmsg(MESSAGE_SIZE,
                                                            socket.CMSG_SPACE(8))
            except BlockingIOError:
                return
            except ConnectionResetError:
                data, ancdata = b"", []
            if len(data) != MESSAGE_SIZE:
                self.do_close(fuzz)
                return
            self.received(fuzz, Message.unpack(data), ancdata)

    def do_close(self, fuzz: FuzzClient) -> None:
        fuzz.closed = True
        fuzz.ref.close()

    def write(self, fuzz: FuzzClient, data: bytes) -> None:
        if fuzz.closed:
            return
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
            fuzz.ref.sock.send(data)

    def received(self, fuzz: FuzzClient, message: Message,
                 ancdata: list[tuple[int, int, bytes]]) -> None:
        ref = fuzz.ref
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                ref.fds = list(fds)
                ref.id = message.time & 0xFFFF
                ref._attach_shm()
        if message.op == Op.RUN:
            if message.time >= S64_MAX or message.time < fuzz.last_run:
                raise InvariantBroken(f"RUN({message.time}) to {fuzz.client.name} after "
                                      f"RUN({fuzz.last_run})")
            fuzz.last_run = ref.time = message.time
            self.runs += 1
            if ref.shm is not None:
                return
        if message.op in (Op.RUN, Op.FREE_UNTIL, Op.BROADCAST):
            fuzz.unacked.append(message)

    # --- the calendar's side ----------------------------------------------------------

    def settle(self) -> None:
        for _ in range(STEPS_PER_SETTLE):
            if not self.calendar.step(0):
                return

    def check(self) -> None:
        calendar = self.calendar
        now = calendar.now
        if now < self.now:
            raise InvariantBroken(f"the clock went back from {self.now} to {now}")
        self.now = now
        shm = calendar.shm
        if shm.current_time < self.current_time:
            raise InvariantBroken(f"current_time went back from {self.current_time} to "
                                  f"{shm.current_time}")
        self.current_time = shm.current_time
        runners = [c for c in calendar.clients if c.state is ClientState.RUNNING]
        if len(runners) > 1 or (runners and runners[0] is not calendar.runner):
            raise InvariantBroken(f"runners: {runners}, calendar.runner={calendar.runner}")
        entries = (shm.length - 4096) // 128
        if shm.running_id >= entries:
            raise InvariantBroken(f"running_id {shm.running_id} is beyond the map")
        runner = calendar.runner
        expected = runner.id if runner is not None and runner.id < entries else 0
        if shm.running_id != expected:
            raise InvariantBroken(f"running_id {shm.running_id} while {runner} runs")


def play(stream: list[tuple[object, ...]], shm: bool, expected: int) -> dict[str, int]:
    """Play one stream; what happened, counted. Raises on a broken invariant."""
    world = FuzzWorld(shm, expected)
    try:
        world.play(stream)
    finally:
        world.close()
    calendar = world.calendar
    return {"actions": world.actions, "runs granted": world.runs,
            "clients dropped": len(calendar.errors),
            "shm clients": sum(c.shm for c in calendar.clients),
            "messages": calendar.messages_received + calendar.messages_sent}
