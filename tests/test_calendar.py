"""The calendar's own surface: in-process jobs, deadlines, doorbells, the controller CLI."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from pytest_umtt.controller import Calendar, StopReason
from pytest_umtt.controller.cli import main as controller_main
from pytest_umtt.wire import S64_MAX, U64_MAX, Op
from tests.conftest import Connect, settle
from tests.refclient import RefClient
from tests.test_scenarios import boot_together, next_run


def test_in_process_jobs_run_at_their_time_in_fifo_order(calendar: Calendar) -> None:
    seen: list[tuple[str, int]] = []
    def record(name: str) -> None:
        seen.append((name, calendar.now))

    for name, when in (("b", 300), ("a", 100), ("c", 300)):
        calendar.call_at(when, functools.partial(record, name), name)
    cancelled = calendar.call_at(200, lambda: seen.append(("x", calendar.now)))
    cancelled.cancel()
    assert calendar.run_until().reason is StopReason.QUIESCENT
    assert seen == [("a", 100), ("b", 300), ("c", 300)]


def test_jobs_interleave_with_clients_on_one_clock(calendar: Calendar,
                                                   connect: Connect) -> None:
    _, ref = connect()
    order: list[str] = []
    calendar.call_at(400, lambda: order.append(f"job@{calendar.now}"))
    calendar.call_at(600, lambda: order.append(f"job@{calendar.now}"))
    boot_together(calendar, (ref, 1, 500))
    assert next_run(calendar, ref) == 500
    order.append(f"client@{ref.time}")
    ref.request(10**6)
    ref.send(Op.WAIT, U64_MAX)
    calendar.run_until(deadline_ns=700)
    assert order == ["job@400", "client@500", "job@600"]


def test_pause_from_a_job_stops_at_that_instant(calendar: Calendar) -> None:
    calendar.call_at(250, calendar.pause)
    calendar.call_at(900, lambda: None)
    stop = calendar.run_until(deadline_ns=10_000)
    assert (stop.reason, stop.time, calendar.now) == (StopReason.PAUSE, 250, 250)


def test_deadline_is_exact_and_events_on_it_run(calendar: Calendar) -> None:
    ran: list[int] = []
    for when in (999, 1000, 1001):
        calendar.call_at(when, lambda: ran.append(calendar.now))
    stop = calendar.run_until(deadline_ns=1000)
    assert (stop.reason, calendar.now, ran) == (StopReason.DEADLINE, 1000, [999, 1000])
    with pytest.raises(ValueError, match="before now"):
        calendar.run_until(deadline_ns=10)
    with pytest.raises(ValueError, match="already at"):
        calendar.call_at(5, lambda: None)


def test_doorbell_pauses_the_ringing_client_at_its_next_step(calendar: Calendar,
                                                             connect: Connect) -> None:
    client, ref = connect(label="ringer")
    boot_together(calendar, (ref, 1, 700))
    assert next_run(calendar, ref) == 700
    seq = ref.send(Op.BROADCAST, 0xBEEF)
    settle(calendar)
    assert ref.recv().seq == seq
    assert ref.shm is not None and ref.shm.free_until == 700  # yields at its next step
    ref.request(956)
    ref.send(Op.WAIT, U64_MAX)
    stop = calendar.run_until()
    assert (stop.reason, stop.client, stop.value) == (StopReason.DOORBELL, client, 0xBEEF)
    assert calendar.now == 956  # the latest instant that is safe to call now (fact 7)


def test_controller_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        controller_main(["--time=/tmp/x.sock", "--clients=-1"])
    assert exit_info.value.code == 2
    assert "must not be negative: '-1'" in capsys.readouterr().err


def read_until(stream: IO[str], text: str) -> list[str]:
    """Lines from ``stream`` up to and including the first that contains ``text``."""
    lines = []
    for line in stream:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never came; got {lines}")


def test_controller_serves_on_at_quiescence_and_exits_0(tmp_path: Path) -> None:
    """Every client waits with nothing scheduled: the controller logs it once and goes on
    serving; a new kernel joins, the idle one is woken by an interrupt (§7.5)."""
    socket_path = tmp_path / "time.sock"
    controller = subprocess.Popen([sys.executable, "-m", "pytest_umtt.controller",
                                   f"--time={socket_path}", "--clients=1", "--debug=1"],
                                  stderr=subprocess.PIPE, text=True)
    assert controller.stderr is not None
    try:
        read_until(controller.stderr, "listening on")
        idle = RefClient.connect(str(socket_path))
        idle.start(1)
        idle.request(S64_MAX)  # nothing to do, ever
        idle.send(Op.WAIT, U64_MAX)
        read_until(controller.stderr, "quiescent at 0.000000000 s: every client waits")
        late = RefClient.connect(str(socket_path))
        late.start(2)
        late.request(1000)
        assert late.wait() == 1000
        idle.interrupt()  # a device interrupt: it reads the clock and asks for now
        late.request(S64_MAX)
        late.send(Op.WAIT, U64_MAX)
        assert idle.until_run() == 1000
        late.close()
        idle.close()
        _, err = controller.communicate(timeout=30)
    finally:
        controller.kill()
    assert controller.returncode == 0, err
    assert "quiescent at 0.000000000 s" not in err  # logged once, read above
    assert not socket_path.exists()
