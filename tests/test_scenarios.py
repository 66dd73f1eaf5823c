"""PROTOCOL.md §5: one test per conformance scenario, against real sockets and memfds."""

from __future__ import annotations

import socket

import pytest

from pytest_umtt.controller import Calendar, ClientState, StopReason
from pytest_umtt.wire import (
    FREE_RUN_SPAN,
    NO_ID,
    S64_MAX,
    U64_MAX,
    Capability,
    ClientFlag,
    Message,
    Op,
    shm_size,
)
from tests.conftest import Connect, settle
from tests.refclient import RefClient


def nothing_to_read(ref: RefClient) -> bool:
    ref.sock.setblocking(False)
    try:
        return ref.sock.recv(16, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return True
    finally:
        ref.sock.settimeout(5.0)


def started(calendar: Calendar, ref: RefClient, start_id: int = NO_ID) -> Message:
    """START and serve it; returns the ACK."""
    ref.send(Op.START, start_id)
    settle(calendar)
    ack = ref.recv_start_ack()
    ref._attach_shm()
    return ack


def booted(calendar: Calendar, ref: RefClient, start_id: int = NO_ID, first: int = 0) -> None:
    """START, request ``first`` and WAIT: the client is then waiting for its first RUN."""
    started(calendar, ref, start_id)
    post_request(calendar, ref, first)
    ref.send(Op.WAIT, U64_MAX)
    settle(calendar)
    if ref.shm is None:
        assert ref.recv().op == Op.ACK


def boot_together(calendar: Calendar, *clients: tuple[RefClient, int, int]) -> None:
    """START every client before any runs (as machines booted at t=0 are), then let each,
    in START-id order, request its first wake-up and WAIT."""
    for ref, start_id, _ in clients:
        ref.send(Op.START, start_id)
    for ref, _, first in sorted(clients, key=lambda c: c[1]):
        settle(calendar)
        ref.recv_start_ack()
        ref._attach_shm()
        post_request(calendar, ref, first)
        ref.send(Op.WAIT, U64_MAX)
        settle(calendar)
        if ref.shm is None:
            assert ref.recv().op == Op.ACK


def post_request(calendar: Calendar, ref: RefClient, when: int) -> None:
    if ref.shm is not None and ref._runner_shares():
        ref.request(when)
    else:
        seq = ref.send(Op.REQUEST, when)
        settle(calendar)
        assert ref.expect_ack(seq).op == Op.ACK


def next_run(calendar: Calendar, ref: RefClient) -> int:
    settle(calendar)
    while True:
        message = ref.recv()
        if message.op == Op.RUN:
            if ref.shm is None:
                ref.ack(message)
            else:
                entry = ref.shm.entry(ref.id)
                entry.flags = entry.flags & ~ClientFlag.REQ_RUN
            settle(calendar)
            ref.time = message.time
            return message.time
        if message.op == Op.ACK:
            continue  # the ACK of a WAIT sent without reading it
        ref._serve(message)
        settle(calendar)


def ask(calendar: Calendar, ref: RefClient, op: Op, time: int = 0) -> Message:
    """Send ``op`` and return its ACK once the calendar served it."""
    seq = ref.send(op, time)
    settle(calendar)
    return ref.expect_ack(seq)


def dropped(calendar: Calendar, detail: str) -> None:
    assert calendar.errors, "no client was dropped"
    assert detail in str(calendar.errors[-1])


# 1-3: START ---------------------------------------------------------------------------

def test_01_start_with_shm(calendar: Calendar, connect: Connect) -> None:
    _, ref = connect()
    ack = started(calendar, ref, 0x1234)
    assert (ack.op, ack.seq, ack.time) == (Op.ACK, 1, 1)
    assert ref.fds_received == 2
    shm = ref.shm
    assert shm is not None
    assert (shm.version, shm.current_time, shm.running_id) == (2, 0, 1)
    assert shm.length >= shm_size(2) and shm.max_clients >= 1
    assert shm.entry(1).name == 0x1234
    assert shm.entry(1).capa == Capability.TIME_SHARE
    assert shm.free_until == 0  # a joiner yields at its first step (§6d)


def test_02_start_without_id(calendar: Calendar, connect: Connect) -> None:
    client, ref = connect()
    ack = started(calendar, ref, NO_ID)
    assert ack.op == Op.ACK and ref.shm is not None
    assert ref.shm.entry(ack.time).name == 0
    assert client.name == "client #1"


def test_03_no_shm_still_sends_two_fds(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, ref = connect(cal)
        ref.send(Op.START, 7)
        settle(cal)
        ref.recv_start_ack()
        assert len(ref.fds) == 2  # never zero fds: §6b
        ref._attach_shm()
        assert ref.shm is None  # the memfd's version is not 2


# 4-5: gating and order ------------------------------------------------------------------

def test_04_gating_holds_acks_until_n_starts(connect: Connect) -> None:
    with Calendar(expected_clients=2) as cal:
        _, a = connect(cal)
        _, b = connect(cal)
        a.send(Op.START, 1)
        settle(cal)
        assert nothing_to_read(a)
        b.send(Op.START, 2)
        settle(cal)
        assert a.recv_start_ack().op == Op.ACK


def test_05_lower_start_id_is_served_first(connect: Connect) -> None:
    with Calendar(expected_clients=2) as cal:
        _, b = connect(cal)
        _, a = connect(cal)
        b.send(Op.START, 0x20)
        a.send(Op.START, 0x10)
        settle(cal)
        assert a.recv_start_ack().time == 1
        assert nothing_to_read(b)
        a.send(Op.WAIT, U64_MAX)
        settle(cal)
        assert b.recv_start_ack().time == 2


# 6-9: one client ------------------------------------------------------------------------

def test_06_shm_wait_has_no_ack_and_run_follows_request(calendar: Calendar,
                                                         connect: Connect) -> None:
    _, ref = connect()
    booted(calendar, ref, 1, first=1000)
    assert next_run(calendar, ref) == 1000
    assert ref.shm is not None
    assert ref.shm.current_time == 1000
    assert ref.shm.free_until == FREE_RUN_SPAN + 1000
    assert [m.op for m in ref.received].count(Op.ACK) == 1  # only the START ACK


def test_07_single_client_without_shm(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, ref = connect(cal)
        started(cal, ref, 1)
        post_request(cal, ref, 1000)
        seq = ref.send(Op.WAIT, U64_MAX)
        settle(cal)
        assert ref.recv() == Message(Op.ACK, seq, 0)
        free_until = ref.recv()
        assert (free_until.op, free_until.time) == (Op.FREE_UNTIL, FREE_RUN_SPAN + 1000)
        ref.ack(free_until)
        settle(cal)
        run = ref.recv()
        assert (run.op, run.time) == (Op.RUN, 1000)
        ref.ack(run)
        settle(cal)
        assert not cal.errors


def test_08_get_get_tod_update(connect: Connect) -> None:
    with Calendar(shm=False, time_at_start=5_000) as cal:
        _, ref = connect(cal)
        booted(cal, ref, 1, first=1000)
        next_run(cal, ref)
        assert ask(cal, ref, Op.GET).time == 1000
        assert ask(cal, ref, Op.GET_TOD).time == 6000
        ask(cal, ref, Op.UPDATE, 1200)
        assert ask(cal, ref, Op.GET).time == 1200
        assert cal.now == 1200


def test_09_runner_request_gets_free_until_before_its_ack(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, ref = connect(cal)
        booted(cal, ref, 1, first=1000)
        next_run(cal, ref)
        seq = ref.send(Op.REQUEST, 3000)
        settle(cal)
        first = ref.recv()
        assert (first.op, first.time) == (Op.FREE_UNTIL, 3000)
        ref.ack(first)
        settle(cal)
        assert ref.recv() == Message(Op.ACK, seq, 0)


# 10-15: several clients -----------------------------------------------------------------

def two_waiting(calendar: Calendar, connect: Connect, first_a: int,
                first_b: int) -> tuple[RefClient, RefClient]:
    _, a = connect()
    _, b = connect()
    boot_together(calendar, (a, 1, first_a), (b, 2, first_b))
    return a, b


def test_10_two_shm_clients_earliest_first(calendar: Calendar, connect: Connect) -> None:
    a, b = two_waiting(calendar, connect, 100, 50)
    assert next_run(calendar, b) == 50
    assert b.shm is not None and b.shm.free_until == 100
    assert nothing_to_read(a)


def test_11_shm_request_posted_while_another_runs(calendar: Calendar,
                                                  connect: Connect) -> None:
    a, b = two_waiting(calendar, connect, 500, 50)
    assert next_run(calendar, b) == 50
    a.request(70)  # a waiting shm client writes its request straight into shm
    assert b.shm is not None and b.shm.free_until == 70
    b.request(900)
    b.send(Op.WAIT, U64_MAX)
    assert next_run(calendar, a) == 70


def test_12_request_message_while_shm_client_runs(calendar: Calendar,
                                                  connect: Connect) -> None:
    a, b = two_waiting(calendar, connect, 500, 50)
    next_run(calendar, b)
    seq = a.send(Op.REQUEST, 80)
    settle(calendar)
    assert a.recv() == Message(Op.ACK, seq, 0)
    assert a.shm is not None
    entry = a.shm.entry(a.id)
    assert (entry.req_time, entry.flags) == (80, ClientFlag.REQ_RUN)
    assert a.shm.free_until == 80
    assert nothing_to_read(a)  # no RUN until b waits
    b.send(Op.WAIT, U64_MAX)
    assert next_run(calendar, a) == 80


def request_under_a_message_runner(cal: Calendar, connect: Connect) -> tuple[
        RefClient, RefClient, int]:
    """A (waiting, at 500) asks for 70 while B (a message client) runs from 50: the
    requester, the runner and the REQUEST's seq."""
    _, a = connect(cal, "A")
    _, b = connect(cal, "B")
    boot_together(cal, (a, 1, 500), (b, 2, 50))
    next_run(cal, b)
    seq = a.send(Op.REQUEST, 70)
    settle(cal)
    return a, b, seq


def test_13_message_runner_acks_earlier_request_before_requester_goes_on(
        connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        a, b, seq = request_under_a_message_runner(cal, connect)
        lowered = b.recv()
        assert (lowered.op, lowered.time) == (Op.FREE_UNTIL, 70)
        assert nothing_to_read(a)  # held until the runner has ACKed (§7.2)
        b.ack(lowered)
        settle(cal)
        assert a.recv() == Message(Op.ACK, seq, 0)


def test_13_held_ack_is_released_when_the_runner_leaves(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        a, b, seq = request_under_a_message_runner(cal, connect)
        assert nothing_to_read(a)
        b.close()
        settle(cal)
        assert a.recv() == Message(Op.ACK, seq, 0)
        a.send(Op.WAIT, U64_MAX)
        assert next_run(cal, a) == 70 and not cal.errors


def test_14_ties_run_in_request_order(calendar: Calendar, connect: Connect) -> None:
    _, a = connect()
    _, b = connect()
    _, c = connect()
    boot_together(calendar, (a, 1, S64_MAX), (b, 2, S64_MAX), (c, 3, S64_MAX))
    for ref in (c, a, b):  # nobody runs: requests arrive as messages, in this order
        post_request(calendar, ref, 100)
    order = []
    for _ in range(3):
        settle(calendar)
        runner = next(r for r in (a, b, c) if not nothing_to_read(r))
        order.append(runner)
        next_run(calendar, runner)
        runner.request(S64_MAX)
        runner.send(Op.WAIT, U64_MAX)
    assert order == [c, a, b]


def test_15_req_run_left_set_reschedules(calendar: Calendar, connect: Connect) -> None:
    _, ref = connect()
    booted(calendar, ref, 1, 100)
    settle(calendar)
    run = ref.recv()
    assert run.time == 100  # the client does not clear REQ_RUN
    ref.send(Op.WAIT, U64_MAX)
    settle(calendar)
    assert ref.recv().time == 100


# 16-17: joining mid-run ------------------------------------------------------------------

def join_while_a_runs(calendar: Calendar, connect: Connect) -> RefClient:
    """A runs at 1000 and asks for 5000; B STARTs meanwhile and joins when A waits."""
    _, a = connect(calendar)
    booted(calendar, a, 1, 1000)
    next_run(calendar, a)
    _, b = connect(calendar)
    b.send(Op.START, 2)
    settle(calendar)
    assert nothing_to_read(b)  # held until the runner waits
    a.request(5000)
    a.send(Op.WAIT, U64_MAX)
    settle(calendar)
    b.recv_start_ack()
    assert len(b.fds) == 2
    b._attach_shm()
    assert calendar.shm.running_id == b.id  # in the map, so named (§7.4)
    return b


def test_16_join_mid_run_with_shm_gets_local_messages(connect: Connect) -> None:
    with Calendar(late_joiners_shm=True) as calendar:
        b = join_while_a_runs(calendar, connect)
        assert b.shm is not None and b.offset == 1000  # §7.1: shm fields absolute
        b.request(200)
        assert calendar.shm.entry(b.id).req_time == 1200
        b.send(Op.WAIT, U64_MAX)
        assert next_run(calendar, b) == 200  # RUN local: an absolute one BUGs it (§6a)
        assert calendar.now == 1200
        seq = b.send(Op.REQUEST, 300)  # a REQUEST message is local too
        settle(calendar)
        assert b.expect_ack(seq).op == Op.ACK and b.shm.entry(b.id).req_time == 1300


def test_16_join_mid_run_over_messages(calendar: Calendar, connect: Connect) -> None:
    b = join_while_a_runs(calendar, connect)
    assert b.shm is None  # by default, served over messages with a decoy memfd


def test_17_join_mid_run_offsets_local_times(connect: Connect) -> None:
    with Calendar(shm=False, time_at_start=10**9) as cal:
        _, a = connect(cal)
        booted(cal, a, 1, 1000)
        next_run(cal, a)
        post_request(cal, a, 5000)
        a.send(Op.WAIT, U64_MAX)
        assert cal.run_until(deadline_ns=1000).reason is StopReason.DEADLINE
        a.recv()
        _, b = connect(cal)
        started(cal, b, 2)
        assert ask(cal, b, Op.GET).time == 0
        assert ask(cal, b, Op.GET_TOD).time == 10**9 + 1000
        post_request(cal, b, 200)
        b.send(Op.WAIT, U64_MAX)
        settle(cal)
        b.recv()
        assert next_run(cal, b) == 200
        assert cal.now == 1200


# 18-19: broadcast -------------------------------------------------------------------------

def test_18_broadcast_reaches_others_then_acks_sender(connect: Connect) -> None:
    with Calendar(pause_on_broadcast=False) as cal:
        _, a = connect(cal)
        _, b = connect(cal)
        _, c = connect(cal)
        boot_together(cal, (b, 2, 900), (c, 3, 900), (a, 1, 100))
        next_run(cal, a)
        seq = a.send(Op.BROADCAST, 0xABC)
        settle(cal)
        assert nothing_to_read(a)
        for other in (b, c):
            message = other.recv()
            assert (message.op, message.time) == (Op.BROADCAST, 0xABC)
            other.ack(message)
            settle(cal)
        assert a.recv() == Message(Op.ACK, seq, 0)
        assert nothing_to_read(b) and nothing_to_read(c)


def test_19_broadcast_skips_clients_not_started(calendar: Calendar,
                                                connect: Connect) -> None:
    calendar.pause_on_broadcast = False
    _, a = connect()
    _, idle = connect()
    booted(calendar, a, 1, 100)
    next_run(calendar, a)
    seq = a.send(Op.BROADCAST, 5)
    settle(calendar)
    assert a.recv() == Message(Op.ACK, seq, 0)
    assert nothing_to_read(idle)


# 20-25: leaving -----------------------------------------------------------------------------

def test_20_runner_disconnects(calendar: Calendar, connect: Connect) -> None:
    ca, a = connect()
    _, b = connect()
    boot_together(calendar, (a, 1, 100), (b, 2, 200))
    next_run(calendar, a)
    a_id = a.id
    a.close()
    assert next_run(calendar, b) == 200
    assert calendar.shm.running_id == b.id
    assert calendar.shm.entry(a_id).capa == 0
    assert ca.state is ClientState.GONE and not calendar.errors


def test_21_waiting_client_disconnects(calendar: Calendar, connect: Connect) -> None:
    ca, a = connect()
    _, b = connect()
    boot_together(calendar, (a, 1, 100), (b, 2, 200))
    a.close()
    settle(calendar)
    assert ca.request is None
    assert b.runs == [] and next_run(calendar, b) == 200


def test_22_disconnect_before_start(calendar: Calendar, connect: Connect) -> None:
    _, a = connect()
    a.close()
    settle(calendar)
    _, b = connect()
    booted(calendar, b, 1, 10)
    assert next_run(calendar, b) == 10


def test_23_disconnect_after_start_before_ack(connect: Connect) -> None:
    with Calendar(expected_clients=3) as cal:
        _, a = connect(cal)
        _, b = connect(cal)
        _, c = connect(cal)
        a.send(Op.START, 1)
        b.send(Op.START, 2)
        settle(cal)
        a.close()
        c.send(Op.START, 3)
        settle(cal)
        assert b.recv_start_ack().op == Op.ACK


def test_25_nothing_requested_is_quiescent(calendar: Calendar, connect: Connect) -> None:
    _, a = connect()
    started(calendar, a, 1)
    a.send(Op.WAIT, U64_MAX)
    stop = calendar.run_until(stall_timeout=5)
    assert stop.reason is StopReason.QUIESCENT and stop.time == 0


# 26-33: robustness: the offender is dropped, the others go on --------------------------

@pytest.mark.parametrize(
    ("misdeed", "detail"),
    [
        (lambda r: r.send_raw(b"\x02\x00\x00\x00\x05\x00\x00\x00"), "short message of 8 bytes"),
        (lambda r: r.send(Op.RUN, 5), "RUN is the controller's to send"),
        (lambda r: r.send(Op.FREE_UNTIL, 5), "FREE_UNTIL is the controller's to send"),
        (lambda r: r.send(Op.ACK, 0, seq=77), "ACK that answers nothing"),
        (lambda r: r.send(Op.START, 9), "START sent twice"),
        (lambda r: r.send(Op.REQUEST, 10), "request for 0.000000010 s, which is in the past"),
        (lambda r: r.send(Op.UPDATE, 500), "UPDATE from a client that is not running"),
        (lambda r: r.send(Op.WAIT, U64_MAX), "WAIT from a client that is not running"),
    ],
)
def test_26_to_33_misbehaving_client_is_dropped(calendar: Calendar, connect: Connect,
                                                misdeed: object, detail: str) -> None:
    bad_client, bad = connect(label="bad")
    _, good = connect()
    boot_together(calendar, (bad, 1, 5000), (good, 2, 100))
    next_run(calendar, good)  # good runs at 100; bad waits
    good.sleep(0)
    misdeed(bad)  # type: ignore[operator]
    settle(calendar)
    dropped(calendar, detail)
    assert "bad" in str(calendar.errors[-1]) and "0.000000100 s" in str(calendar.errors[-1])
    assert bad_client.state is ClientState.GONE
    good.request(300)
    good.send(Op.WAIT, U64_MAX)
    assert next_run(calendar, good) == 300


def test_27_unknown_op_is_acked(calendar: Calendar, connect: Connect) -> None:
    _, a = connect()
    started(calendar, a, 1)
    seq = a.send(42, 7)
    settle(calendar)
    assert a.recv() == Message(Op.ACK, seq, 0)
    assert not calendar.errors


@pytest.mark.parametrize("op", [Op.REQUEST, Op.GET, Op.UPDATE, Op.WAIT, Op.BROADCAST])
def test_31_requests_before_start_are_errors(calendar: Calendar, connect: Connect,
                                             op: Op) -> None:
    _, a = connect()
    a.send(op, 10)
    settle(calendar)
    assert calendar.errors and "client #1" in str(calendar.errors[0])


def test_33_update_backwards_and_beyond_next_event(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, a = connect(cal, "A")
        _, b = connect(cal, "B")
        boot_together(cal, (b, 2, 2000), (a, 1, 1000))
        next_run(cal, a)
        a.send(Op.UPDATE, 500)
        settle(cal)
        dropped(cal, "UPDATE goes backwards")
        assert next_run(cal, b) == 2000
        b.send(Op.UPDATE, 2500)
        settle(cal)
        assert b.recv().op == Op.ACK and cal.now == 2500


def test_33_update_past_next_event_is_rejected(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, a = connect(cal, "A")
        _, b = connect(cal, "B")
        boot_together(cal, (b, 2, 2000), (a, 1, 1000))
        next_run(cal, a)
        a.send(Op.UPDATE, 2001)
        settle(cal)
        dropped(cal, "passes the next event at 0.000002000 s")
        assert next_run(cal, b) == 2000


# 34-37 ------------------------------------------------------------------------------------

def test_34_client_limits_and_id_reuse(calendar: Calendar, connect: Connect) -> None:
    refs = [connect()[1] for _ in range(65)]
    for n, ref in enumerate(refs, 1):
        ref.send(Op.START, n)
        settle(calendar)
        ref.recv_start_ack()
        ref._attach_shm()
        ref.send(Op.WAIT, U64_MAX)
        settle(calendar)
        if ref.shm is None:
            ref.recv()
    with_shm = [r for r in refs if r.shm is not None]
    assert len(with_shm) == 63
    assert calendar.shm.length >= shm_size(max(r.id for r in with_shm) + 1)
    assert len({r.id for r in refs}) == 65
    refs[4].close()
    settle(calendar)
    _, late = connect()
    late.send(Op.START, 99)
    settle(calendar)
    assert late.recv_start_ack().time == refs[4].id  # ids are reused


def test_35_large_times(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, a = connect(cal)
        booted(cal, a, 1, S64_MAX)  # "sleep forever" is not a job
        assert cal.run_until(stall_timeout=5).reason is StopReason.QUIESCENT
        _, b = connect(cal)
        booted(cal, b, 2, S64_MAX - 10)
        assert next_run(cal, b) == S64_MAX - 10
        assert b.free_until is not None and b.free_until <= U64_MAX
        assert b.free_until == S64_MAX - 10 + FREE_RUN_SPAN


def test_36_free_until_stays_below_uncollected_request(calendar: Calendar,
                                                       connect: Connect) -> None:
    _, a = connect()
    _, b = connect()
    _, c = connect()
    boot_together(calendar, (b, 2, 5000), (c, 3, 6000), (a, 1, 100))
    next_run(calendar, a)
    b.request(1200)
    assert calendar.shm.free_until == 1200
    c.close()
    settle(calendar)
    assert calendar.shm.free_until == 1200
    a.request(2000)
    a.send(Op.WAIT, U64_MAX)
    assert next_run(calendar, b) == 1200


def test_runner_that_leaves_does_not_lose_requests_written_while_it_ran(
        calendar: Calendar, connect: Connect) -> None:
    _, a = connect()
    _, b = connect()
    boot_together(calendar, (b, 2, 5000), (a, 1, 100))
    next_run(calendar, a)
    b.request(1200)  # into shared memory, picked up when the runner stops running
    a.close()  # ... which it does by leaving, without a WAIT
    assert next_run(calendar, b) == 1200


def test_37_seq_bookkeeping(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, a = connect(cal)
        booted(cal, a, 1, 100)
        for _ in range(3):
            next_run(cal, a)
            post_request(cal, a, a.time + 100)
            a.send(Op.WAIT, U64_MAX)
            settle(cal)
        ours = [m.seq for m in a.received if m.op in (Op.RUN, Op.FREE_UNTIL)]
        assert ours == sorted(ours) and len(set(ours)) == len(ours)
        assert all(m.seq <= a.seq for m in a.received if m.op == Op.ACK)
