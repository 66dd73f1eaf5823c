"""What a controller must do that usfstl gets wrong or leaves open (PROTOCOL.md §7), and
how the calendar stays up when clients misbehave: one test per behaviour."""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_umtt.controller import Calendar, ClientState, StopReason
from pytest_umtt.controller.reactor import MAX_BACKLOG
from pytest_umtt.errors import SocketInUseError
from pytest_umtt.wire import (
    NO_ID,
    S64_MAX,
    SHM_HEADER_SIZE,
    SHM_VERSION,
    U64_MAX,
    ClientFlag,
    Message,
    Op,
    shm_size,
)
from tests.conftest import Connect, settle
from tests.refclient import RefClient
from tests.test_calendar import read_until
from tests.test_scenarios import (
    ask,
    boot_together,
    booted,
    next_run,
    nothing_to_read,
    post_request,
    started,
)


def declining(connect: Connect, cal: Calendar, label: str | None = None) -> RefClient:
    """A client that leaves the offered memory alone (failed mmap, no schedshm)."""
    _, ref = connect(cal, label)
    ref.take_shm = False
    return ref


# 1: shared memory is the client's choice ----------------------------------------------

def test_client_that_declines_the_memory_is_served_over_messages(calendar: Calendar,
                                                                 connect: Connect) -> None:
    _, sharer = connect()
    decliner = declining(connect, calendar)
    boot_together(calendar, (sharer, 1, 500), (decliner, 2, 100))
    assert decliner.fds_received == 2 and decliner.shm is None
    assert [c.shm for c in calendar.clients] == [True, False]
    assert next_run(calendar, decliner) == 100  # FREE_UNTIL, then RUN, ACKed
    assert decliner.free_until == 500
    post_request(calendar, decliner, 700)
    seq = decliner.send(Op.WAIT, U64_MAX)
    settle(calendar)
    assert decliner.recv() == Message(Op.ACK, seq, 0)  # its WAIT is ACKed
    assert next_run(calendar, sharer) == 500
    sharer.request(S64_MAX)
    sharer.send(Op.WAIT, U64_MAX)
    assert next_run(calendar, decliner) == 700
    assert not calendar.errors


# 2: running_id ----------------------------------------------------------------------

def test_running_id_names_message_runners_in_the_map_and_nobody_beyond(
        connect: Connect) -> None:
    with Calendar(shm_clients=2) as cal:  # entries 1 and 2 lie inside the map
        refs = [declining(connect, cal) for _ in range(3)]
        boot_together(cal, *((ref, n, 100 * n) for n, ref in enumerate(refs, 1)))
        assert cal.shm.length == shm_size(3)
        seen = []
        for ref in refs:
            next_run(cal, ref)
            seen.append(cal.shm.running_id)
            post_request(cal, ref, S64_MAX)
            ref.send(Op.WAIT, U64_MAX)
            settle(cal)
        assert seen == [1, 2, 0]  # id 3 has no entry: the kernel indexes it unchecked
        assert not cal.errors


def test_a_client_beyond_the_map_gets_the_decoy(connect: Connect) -> None:
    with Calendar(shm_clients=1) as cal:
        _, first = connect(cal)
        _, second = connect(cal)
        boot_together(cal, (first, 1, S64_MAX), (second, 2, S64_MAX))
        assert first.shm is not None and second.shm is None
        assert not cal.errors


# 3: now while a shm kernel runs --------------------------------------------------------

def test_now_is_what_the_shm_runner_published(connect: Connect) -> None:
    with Calendar(time_at_start=10**9) as cal:
        _, runner = connect(cal)
        asker = declining(connect, cal)
        boot_together(cal, (runner, 1, 1000), (asker, 2, 9000))
        next_run(cal, runner)
        runner.time = 1500  # free-ran, then kicked a virtio device (time.c:296-306)
        runner.propagate()
        assert ask(cal, asker, Op.GET).time == 1500
        assert ask(cal, asker, Op.GET_TOD).time == 10**9 + 1500
        assert cal.now == 1500


def test_published_time_is_capped_at_free_until(connect: Connect) -> None:
    with Calendar() as cal:
        _, runner = connect(cal)
        asker = declining(connect, cal)
        boot_together(cal, (runner, 1, 1000), (asker, 2, 2000))
        next_run(cal, runner)
        assert cal.shm.free_until == 2000
        cal.shm.current_time = 2500  # a kernel that ran past its horizon
        assert ask(cal, asker, Op.GET).time == 2000


@pytest.mark.parametrize("late_shm", [True, False], ids=["joiner-shm", "joiner-messages"])
def test_a_join_does_not_rewind_the_shared_clock(connect: Connect, late_shm: bool) -> None:
    """A joins while B publishes 1500: the joiner's origin is 1500, and B, waiting,
    reads no earlier time when an interrupt comes (it would panic, time.c:50-53)."""
    with Calendar(late_joiners_shm=late_shm) as calendar:
        _, b = connect(calendar)
        booted(calendar, b, 1, 1000)
        next_run(calendar, b)
        b.time = 1500
        b.propagate()
        _, joiner = connect(calendar)
        joiner.send(Op.START, 2)
        settle(calendar)
        b.request(5000)
        b.send(Op.WAIT, U64_MAX)
        settle(calendar)
        joiner.recv_start_ack()
        joiner._attach_shm()
        assert (joiner.shm is not None) == late_shm
        assert calendar.shm.current_time == 1500
        assert ask(calendar, joiner, Op.GET_TOD).time == 1500
        assert ask(calendar, joiner, Op.GET).time == 0
        post_request(calendar, b, b.read_clock())  # an interrupt (time.c:581-592)
        assert b.time == 1500  # current_time was not behind its own clock
        post_request(calendar, joiner, 10)
        joiner.send(Op.WAIT, U64_MAX)
        settle(calendar)
        if joiner.shm is None:
            assert joiner.recv().op == Op.ACK
        assert next_run(calendar, b) == 1500
        b.request(S64_MAX)
        b.send(Op.WAIT, U64_MAX)
        assert next_run(calendar, joiner) == 10  # local time: 1510 on the shared clock
        assert calendar.now == 1510 and not calendar.errors


# 4 is test_13_* in test_scenarios.py.

# 5: quiescence is test_controller_serves_on_at_quiescence_and_exits_0 in test_calendar.py.

# 6: no id ------------------------------------------------------------------------------

def test_kernel_without_an_id_starts_first(connect: Connect) -> None:
    with Calendar(expected_clients=3) as cal:
        _, with_id = connect(cal)
        _, zero = connect(cal)
        _, without = connect(cal)
        with_id.send(Op.START, 5)
        zero.send(Op.START, 0)
        without.send(Op.START, NO_ID)
        settle(cal)
        assert zero.recv_start_ack().time == 1  # ID 0 came first, the no-id one sorts as 0
        assert nothing_to_read(without) and nothing_to_read(with_id)
        zero.send(Op.WAIT, U64_MAX)
        settle(cal)
        assert without.recv_start_ack().time == 2
        assert nothing_to_read(with_id)


# 7: REQUEST messages while a shm kernel runs ---------------------------------------------

def test_request_messages_wait_for_the_shm_runner_and_go_in_start_order(
        calendar: Calendar, connect: Connect) -> None:
    _, sharer = connect()
    talker = declining(connect, calendar)
    _, runner = connect()
    boot_together(calendar, (sharer, 1, S64_MAX), (talker, 2, S64_MAX), (runner, 3, 50))
    next_run(calendar, runner)
    post_request(calendar, talker, 100)  # first in host order, by message
    entry = calendar.shm.entry(talker.id)
    assert (entry.flags, entry.req_time) == (ClientFlag.REQ_RUN, 100)  # mirrored
    assert calendar.shm.free_until == 100
    sharer.request(100)  # then by shared memory, at the same instant
    runner.request(S64_MAX)
    runner.send(Op.WAIT, U64_MAX)
    settle(calendar)
    assert nothing_to_read(talker)  # the earlier starter goes first
    assert next_run(calendar, sharer) == 100
    sharer.request(S64_MAX)
    sharer.send(Op.WAIT, U64_MAX)
    assert next_run(calendar, talker) == 100
    assert entry.flags == 0  # cleared on its behalf when it ran
    assert not calendar.errors


# 8: S64_MAX -------------------------------------------------------------------------------

@pytest.mark.parametrize("local", [S64_MAX, S64_MAX + 1, U64_MAX, S64_MAX - 500])
def test_requests_at_or_beyond_s64_max_are_never_granted(connect: Connect,
                                                         local: int) -> None:
    with Calendar(shm=False) as cal:
        _, early = connect(cal)
        booted(cal, early, 1, 1000)
        next_run(cal, early)
        post_request(cal, early, S64_MAX)
        early.send(Op.WAIT, U64_MAX)
        settle(cal)
        assert early.recv().op == Op.ACK
        _, late = connect(cal)  # joins at 1000: its local times are offset by 1000
        started(cal, late, 2)
        post_request(cal, late, local)
        late.send(Op.WAIT, U64_MAX)
        settle(cal)
        assert late.recv().op == Op.ACK
        assert cal.run_until(stall_timeout=5).reason is StopReason.QUIESCENT
        assert nothing_to_read(late) and nothing_to_read(early) and not cal.errors


def test_shm_request_at_s64_max_is_never_granted(calendar: Calendar,
                                                 connect: Connect) -> None:
    _, ref = connect()
    booted(calendar, ref, 1, S64_MAX)
    assert calendar.run_until(stall_timeout=5).reason is StopReason.QUIESCENT
    assert nothing_to_read(ref)


# 9: the decoy memory and the log descriptor ------------------------------------------------

def test_decoy_memfd_has_len_equal_to_its_size(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        _, ref = connect(cal)
        ref.send(Op.START, 1)
        settle(cal)
        ref.recv_start_ack()
        memfd = ref.fds[0]
        size = os.fstat(memfd).st_size
        with mmap.mmap(memfd, SHM_HEADER_SIZE) as header:
            version, length = struct.unpack_from("=II", header)
        ref._attach_shm()
        assert version != SHM_VERSION and length == size >= SHM_HEADER_SIZE


def test_controller_passes_its_stdout_as_the_log_fd(tmp_path: Path) -> None:
    socket_path = tmp_path / "time.sock"
    with (tmp_path / "stdout").open("wb") as out:
        controller = start_controller(socket_path, "--clients=1", stdout=out)
    try:
        ref = RefClient.connect(str(socket_path))
        ref.send(Op.START, 1)
        ref.recv_start_ack()
        log_fd = ref.fds[1]
        assert os.fstat(log_fd).st_ino == (tmp_path / "stdout").stat().st_ino
        ref._attach_shm()
        ref.close()
        assert controller.wait(timeout=30) == 0
    finally:
        controller.kill()
        controller.communicate()


def start_controller(path: Path, *args: str, **popen: object) -> subprocess.Popen[str]:
    """umtt-controller on ``path``, returned once it listens."""
    controller: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
        [sys.executable, "-m", "pytest_umtt.controller", f"--time={path}", "--debug=1",
         *args], stderr=subprocess.PIPE, text=True, **popen)
    assert controller.stderr is not None
    read_until(controller.stderr, "listening on")
    return controller


# 10: UPDATE past the horizon or the deadline ------------------------------------------------

def test_update_past_the_runs_deadline_is_the_clients_error(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        client, ref = connect(cal, "updater")
        booted(cal, ref, 1, 1000)
        ref.send(Op.UPDATE, 1600)  # read only once it runs, with the deadline at 1500
        stop = cal.run_until(deadline_ns=1500, stall_timeout=5)
        assert (stop.reason, cal.now) == (StopReason.DEADLINE, 1500)
        assert client.state is ClientState.GONE
        assert "UPDATE to 0.000001600 s passes" in str(cal.errors[-1])


def test_update_past_the_horizon_is_the_clients_error(connect: Connect) -> None:
    with Calendar(shm=False, max_free_run=100) as cal:
        client, ref = connect(cal, "updater")
        booted(cal, ref, 1, 1000)
        next_run(cal, ref)
        assert ref.free_until == 1100
        ref.send(Op.UPDATE, 1101)
        settle(cal)
        assert client.state is ClientState.GONE
        assert "passes its horizon at 0.000001100 s" in str(cal.errors[-1])
        assert cal.now == 1000


# 11: a client that does not read ----------------------------------------------------------

def test_a_flooding_client_that_never_reads_is_dropped_alone(connect: Connect) -> None:
    with Calendar(shm=False) as cal:
        flooder_client, flooder = connect(cal, "flooder")
        _, worker = connect(cal, "worker")
        boot_together(cal, (flooder, 1, S64_MAX), (worker, 2, 100))
        flooder.sock.setblocking(False)
        burst = Message(Op.GET, 1, 0).pack() * 256
        began = time.monotonic()
        while flooder_client.state is not ClientState.GONE:
            with contextlib.suppress(BlockingIOError):
                flooder.sock.send(burst)
            settle(cal)
        assert time.monotonic() - began < 3  # nobody waited for it to read
        found = re.search(r"flooder: it does not read its messages \((\d+) bytes",
                          str(cal.errors[-1]))
        assert found and int(found.group(1)) > MAX_BACKLOG
        assert next_run(cal, worker) == 100
        assert len(cal.errors) == 1


# 12: out of file descriptors ----------------------------------------------------------------

def test_running_out_of_descriptors_drops_the_newcomer(tmp_path: Path) -> None:
    socket_path = tmp_path / "time.sock"
    limit = 24

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    controller = start_controller(socket_path, "--clients=1", preexec_fn=low_limit)
    kept: list[RefClient] = []
    try:
        refused = None
        for n in range(1, limit + 1):
            ref = RefClient.connect(str(socket_path))
            ref.send(Op.START, n)
            try:
                ref.recv_start_ack()
            except (EOFError, ConnectionResetError):
                refused = ref
                assert controller.stderr is not None
                line = read_until(controller.stderr, "dropped")[-1]
                assert "no file descriptor left for it (Too many open files)" in line
                break
            ref._attach_shm()
            ref.request(S64_MAX)
            ref.send(Op.WAIT, U64_MAX)
            kept.append(ref)
        assert refused is not None and kept, "the descriptor limit was never reached"
        refused.close()
        kept.pop().close()  # one descriptor free again: the next one gets in
        assert controller.stderr is not None
        read_until(controller.stderr, "disconnected")
        again = RefClient.connect(str(socket_path))
        again.send(Op.START, 99)
        assert again.recv_start_ack().op == Op.ACK
        kept.append(again)
        for ref in kept:
            ref.close()
        _, err = controller.communicate(timeout=30)
    finally:
        controller.kill()
    assert controller.returncode == 0, err


# 13: one controller per socket -----------------------------------------------------------------

def test_listen_refuses_a_live_socket_and_replaces_a_stale_one(tmp_path: Path) -> None:
    path = tmp_path / "time.sock"
    with Calendar() as first:
        first.listen(path)
        with Calendar() as second, pytest.raises(SocketInUseError, match="another"):
            second.listen(path)
        assert path.is_socket()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a controller that died: its socket file stays
    with Calendar() as third:
        third.listen(path)
        ref = RefClient.connect(str(path))
        ref.send(Op.START, 1)
        settle(third)
        assert ref.recv_start_ack().op == Op.ACK
        ref._attach_shm()
        ref.close()


def test_a_second_umtt_controller_on_one_path_fails_clearly(tmp_path: Path) -> None:
    path = tmp_path / "time.sock"
    with Calendar() as live:
        live.listen(path)
        second = subprocess.run([sys.executable, "-m", "pytest_umtt.controller",
                                 f"--time={path}"], capture_output=True, text=True,
                                timeout=30, check=False)
    assert second.returncode == 1
    assert f"another controller is listening on {path}" in second.stderr
