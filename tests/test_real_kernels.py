"""Real UML 6.12 kernels against the calendar: umtt-controller and in-process.

Each guest runs an init script that measures its own clock around a sleep and powers
off; the virtual durations must be exact, whatever the host's speed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_umtt.controller import Calendar, StopReason, Trace
from pytest_umtt.uml.launch import (
    derive_seed,
    kill_process_tree,
    uml_command,
    uml_environment,
)
from pytest_umtt.units import seconds_to_ns
from pytest_umtt.wire import S64_MAX, U64_MAX, Op
from tests.refclient import RefClient
from tests.test_calendar import read_until

CONTROLLER = [sys.executable, "-m", "pytest_umtt.controller"]
"""``umtt-controller`` by module, not by name: the README's ``.venv/bin/pytest`` runs
without the virtualenv on PATH."""

pytestmark = pytest.mark.kernel

SLEEP_INIT = """#!/bin/sh
mount -t proc proc /proc
echo "before $(date +%s%N)"
sleep "$UMTT_SLEEP"
echo "after $(date +%s%N)"
echo "entropy $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')"
echo o > /proc/sysrq-trigger
sleep 1000
"""


@dataclass
class Guest:
    proc: subprocess.Popen[bytes]
    console: Path

    def measured_sleep(self) -> int:
        text = self.console.read_text(errors="replace")
        before = re.search(r"^before (\d+)$", text, re.M)
        after = re.search(r"^after (\d+)$", text, re.M)
        assert before and after, f"guest did not finish; console:\n{text[-2000:]}"
        return int(after.group(1)) - int(before.group(1))

    def entropy(self) -> str:
        found = re.search(r"^entropy ([0-9a-f]+)$", self.console.read_text(), re.M)
        assert found, self.console.read_text()[-2000:]
        return found.group(1)


@pytest.fixture
def guests(uml_kernel: Path, tmp_path: Path) -> Iterator[list[Guest]]:
    """Started guests; whatever happens, their process trees are gone afterwards."""
    started: list[Guest] = []
    yield started
    for guest in started:
        kill_process_tree(guest.proc.pid)
        guest.proc.wait()


def start_guest(kernel: Path, sim_dir: Path, client_id: int, sleep_s: float, *,
                shim: Path | None = None, seed: int = 0, with_id: bool = True) -> Guest:
    """Boot a guest in ``sim_dir/m<id>``; the calendar listens on ``sim_dir/time.sock``.
    Without ``with_id`` the kernel is given ``time-travel=ext:SOCK`` (no ID)."""
    machine_dir = sim_dir / f"m{client_id}"
    machine_dir.mkdir()
    boot = machine_dir / "boot.sh"
    boot.write_text(SLEEP_INIT)
    boot.chmod(0o755)
    console = machine_dir / "console.log"
    command = uml_command(kernel, client_id=client_id, mem="64M",
                          extra=[f"UMTT_SLEEP={sleep_s}"])
    if not with_id:
        command = [re.sub(r"^time-travel=ext:\d+:", "time-travel=ext:", arg)
                   for arg in command]
    env = uml_environment(shim, derive_seed(seed, f"m{client_id}"))
    with console.open("wb") as out:
        proc = subprocess.Popen(command, cwd=machine_dir, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    return Guest(proc, console)


@pytest.mark.parametrize("shm", [True, False], ids=["shm", "messages"])
@pytest.mark.parametrize("count", [1, 2, 4])
def test_kernels_under_umtt_controller(uml_kernel: Path, tmp_path: Path,
                                       guests: list[Guest], count: int, shm: bool) -> None:
    socket_path = tmp_path / "time.sock"
    command = [*CONTROLLER, f"--time={socket_path}", f"--clients={count}", "--debug=1"]
    controller = subprocess.Popen(command + ([] if shm else ["--no-shm"]),
                                  stderr=subprocess.PIPE, text=True)
    try:
        assert controller.stderr is not None
        assert "listening on" in controller.stderr.readline()
        sleeps = [0.25 * (n + 1) for n in range(count)]
        for n, sleep_s in enumerate(sleeps):
            guests.append(start_guest(uml_kernel, tmp_path, n + 1, sleep_s))
        log = controller.communicate(timeout=120)[1]
    finally:
        controller.kill()
    assert controller.returncode == 0, log
    assert not socket_path.exists()
    assert [g.proc.wait(timeout=30) for g in guests] == [0] * count
    mode = " uses shm" if shm else " over messages"
    assert log.count(" join ") == count and log.count(mode) == count, log
    for guest, sleep_s in zip(guests, sleeps, strict=True):
        # Exact virtual time: the sleep plus at most a jiffy (HZ=100) of rounding.
        assert seconds_to_ns(sleep_s) <= guest.measured_sleep() <= seconds_to_ns(sleep_s + 0.01)


def run_in_calendar(kernel: Path, tmp_path: Path, guests: list[Guest], shim: Path,
                    seed: int) -> tuple[list[str], Trace]:
    trace = Trace()
    with Calendar(trace=trace, pause_on_broadcast=False) as calendar:
        calendar.listen(tmp_path / "time.sock")
        batch = [start_guest(kernel, tmp_path, n, 0.5 * n, shim=shim, seed=seed)
                 for n in (1, 2)]
        guests.extend(batch)
        assert calendar.serve_until(lambda: calendar.starts_seen == 2, wall_timeout=30)
        stop = calendar.run_until(stall_timeout=30)
        assert stop.reason is StopReason.QUIESCENT and not calendar.live_clients()
        assert not calendar.errors
    assert [g.proc.wait(timeout=30) for g in batch] == [0, 0]
    return [g.entropy() for g in batch], trace


def test_seed_fixes_guest_entropy_and_trace(uml_kernel: Path, tmp_path: Path,
                                            guests: list[Guest], shim: Path) -> None:
    runs = []
    for n, seed in enumerate((7, 7, 8)):
        run_dir = tmp_path / f"run{n}"
        run_dir.mkdir()
        runs.append(run_in_calendar(uml_kernel, run_dir, guests, shim, seed))
    (bytes_a, trace_a), (bytes_b, trace_b), (bytes_c, _) = runs
    assert bytes_a == bytes_b
    assert trace_a.events == trace_b.events
    assert len(trace_a) > 10
    assert bytes_c != bytes_a
    assert bytes_a[0] != bytes_a[1]  # two machines, two streams


def start_controller(socket_path: Path, *args: str) -> subprocess.Popen[str]:
    """umtt-controller, returned once it listens."""
    controller = subprocess.Popen([*CONTROLLER, f"--time={socket_path}", "--debug=1",
                                   *args], stderr=subprocess.PIPE, text=True)
    assert controller.stderr is not None
    assert "listening on" in controller.stderr.readline()
    return controller


def test_kernel_without_an_id_starts_first(uml_kernel: Path, tmp_path: Path,
                                           guests: list[Guest]) -> None:
    socket_path = tmp_path / "time.sock"
    controller = start_controller(socket_path, "--clients=2")
    try:
        guests.append(start_guest(uml_kernel, tmp_path, 1, 0.25))
        guests.append(start_guest(uml_kernel, tmp_path, 2, 0.25, with_id=False))
        log = controller.communicate(timeout=120)[1]
    finally:
        controller.kill()
    assert controller.returncode == 0, log
    joins = [line for line in log.splitlines() if " join " in line]
    assert len(joins) == 2 and "join client #" in joins[0] and "0x1" in joins[1], log
    for guest in guests:
        assert 250_000_000 <= guest.measured_sleep() <= 260_000_000


def test_quiescent_controller_is_woken_by_a_new_kernel(uml_kernel: Path, tmp_path: Path,
                                                       guests: list[Guest]) -> None:
    """A participant idles with nothing scheduled at 1 ms: the controller keeps serving,
    and a kernel that connects then joins over shared memory and runs exactly (§7.5)."""
    socket_path = tmp_path / "time.sock"
    controller = start_controller(socket_path, "--clients=1")
    idle = RefClient.connect(str(socket_path))
    try:
        idle.start(7)
        idle.request(10**6)
        assert idle.wait() == 10**6
        idle.request(S64_MAX)
        idle.send(Op.WAIT, U64_MAX)
        assert controller.stderr is not None
        assert "quiescent at 0.001000000 s" in read_until(controller.stderr, "quiescent")[-1]
        guest = start_guest(uml_kernel, tmp_path, 1, 0.25)
        guests.append(guest)
        assert guest.proc.wait(timeout=120) == 0
        idle.close()
        log = controller.communicate(timeout=60)[1]
    finally:
        controller.kill()
    assert controller.returncode == 0, log
    # It joined at 1 ms over shared memory, with RUN messages in its local time (§7.1).
    assert "join client 0x1 offered shm" in log and "client 0x1 uses shm" in log, log
    assert 250_000_000 <= guest.measured_sleep() <= 260_000_000


def test_message_runner_with_a_joining_requester(uml_kernel: Path, tmp_path: Path,
                                                 guests: list[Guest]) -> None:
    """Over messages, a kernel joins while another runs; its requests lower the runner's
    horizon, and both sleeps stay exact (§7.2)."""
    trace = Trace()
    with Calendar(shm=False, trace=trace, pause_on_broadcast=False) as calendar:
        calendar.listen(tmp_path / "time.sock")
        first = start_guest(uml_kernel, tmp_path, 1, 0.5)
        guests.append(first)
        assert calendar.serve_until(lambda: calendar.starts_seen == 1, wall_timeout=30)
        calendar.run_until(deadline_ns=seconds_to_ns(0.1), stall_timeout=30)
        second = start_guest(uml_kernel, tmp_path, 2, 0.25)
        guests.append(second)
        assert calendar.serve_until(lambda: calendar.starts_seen == 2, wall_timeout=30)
        stop = calendar.run_until(lambda: not calendar.live_clients(), stall_timeout=30)
        assert stop.reason is not StopReason.DEADLINE and not calendar.errors
    assert [g.proc.wait(timeout=30) for g in guests] == [0, 0]
    assert 500_000_000 <= first.measured_sleep() <= 510_000_000
    assert 250_000_000 <= second.measured_sleep() <= 260_000_000
    joins = trace.of_kind("join")
    assert joins[1].now >= seconds_to_ns(0.1)  # it joined mid-run, over messages
    lowered = [e for e in trace.of_kind("tx") if e.op == "FREE_UNTIL" and e.now > joins[1].now]
    assert lowered
