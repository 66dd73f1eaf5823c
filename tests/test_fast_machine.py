"""Machine and simulation logic against the fake guest (tests/fakeguest.py): commands,
their virtual times, background commands, budgets, crashes, stalls, several machines
and teardown, without a kernel (the whole file: about 10 s of wall time)."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from pytest_umtt import (
    BootError,
    CommandTimeout,
    KillError,
    MachineCrashed,
    MachineError,
    MachineStalled,
    Simulation,
    format_ns,
    units,
)
from pytest_umtt import simulation as simulation_module
from pytest_umtt.controller import StopReason
from pytest_umtt.kernel import KernelCheck
from pytest_umtt.uml import machine as machine_module
from pytest_umtt.units import UnitChangedWarning, seconds_to_ns

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fake_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An executable that boots the fake guest the way UML boots a kernel."""
    path = tmp_path_factory.mktemp("fake") / "linux"
    path.write_text(f"#!{sys.executable}\n"
                    f"import sys\nsys.path.insert(0, {str(REPO)!r})\n"
                    f"from tests.fakeguest import main\nsys.exit(main(sys.argv[1:]))\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def sim(fake_kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[Simulation]:
    monkeypatch.setattr(simulation_module, "check_kernel",
                        lambda path: KernelCheck(path, (), ()))
    with Simulation(kernel=fake_kernel, directory=tmp_path / "sim", wall_timeout=5,
                    deterministic=False) as simulation:
        yield simulation


def test_a_command_returns_its_status_and_output_apart(sim: Simulation) -> None:
    machine = sim.machine("fake")
    assert machine.agent_console is None  # no virtio-console in a fake: the polling agent
    result = machine.run("echo out\nwarn err\nexit 3")
    assert (result.status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert result.ended_ns == result.started_ns


def test_back_to_back_commands_take_exactly_their_virtual_time(sim: Simulation) -> None:
    machine = sim.machine("fake")
    first = machine.run("sleep 1.5")
    second = machine.run("sleep 0.25")
    assert first.ended_ns - first.started_ns == seconds_to_ns(1.5)
    assert second.started_ns == first.ended_ns
    assert second.duration == 0.25


def test_a_command_after_idling_starts_within_the_agents_poll(sim: Simulation) -> None:
    machine = sim.machine("fake", idle_max=0.1)
    sim.advance(10)
    submitted = sim.now
    late = machine.run("echo").started - submitted
    assert 0 <= late <= 0.1


def test_background_commands_overlap(sim: Simulation) -> None:
    machine = sim.machine("fake")
    slow = machine.start("sleep 3\necho slow")
    fast = machine.run("sleep 1\necho fast")
    assert fast.output == "fast\n" and not slow.done
    result = slow.wait()
    assert result.output == "slow\n"
    assert result.ended_ns - slow.started_ns == seconds_to_ns(3)


def test_a_command_over_its_budget_is_killed_and_the_machine_goes_on(sim: Simulation) -> None:
    machine = sim.machine("fake")
    submitted = sim.now_ns
    with pytest.raises(CommandTimeout, match="did not finish within 1 s") as timed_out:
        machine.run("echo before\nwarn half\nsleep 10\necho never", timeout=1)
    error = timed_out.value
    assert (error.command, error.timeout, error.timeout_ns) == (
        "echo before\nwarn half\nsleep 10\necho never", 1.0, seconds_to_ns(1))
    assert (error.stdout, error.stderr) == (b"before\n", b"half\n")
    assert error.now_ns - submitted == seconds_to_ns(1)
    after = machine.run("echo ok")
    assert after.output == "ok\n" and after.started_ns == submitted + seconds_to_ns(1)


def test_over_files_the_default_budget_stops_the_machine(sim: Simulation) -> None:
    machine = sim.machine("fake", default_timeout=5)
    with pytest.raises(CommandTimeout, match="within 5 s of virtual time and could not be "
                       "killed") as timed_out:
        machine.run("sleep 1\nsleep 100")
    assert timed_out.value.now == 5.0
    with pytest.raises(MachineCrashed, match="only a command given timeout= is"):
        machine.run("exit 4")


def test_a_command_that_survives_its_kill_stops_the_machine(sim: Simulation) -> None:
    machine = sim.machine("fake")
    with pytest.raises(CommandTimeout, match="did not end when killed; the machine was stopped"):
        machine.run("unkillable 100", timeout=1)
    assert not machine.alive
    with pytest.raises(MachineCrashed, match="did not end when killed"):
        machine.run("echo")


def test_a_command_killed_before_its_budget_is_no_timeout(sim: Simulation) -> None:
    machine = sim.machine("fake")
    assert machine.run("sleep 1\nexit 137", timeout=2).status == 137


def test_a_panic_on_the_console_is_a_crash_with_its_cause(sim: Simulation) -> None:
    machine = sim.machine("fake")
    with pytest.raises(MachineCrashed, match="Kernel panic - not syncing: the fake guest"):
        machine.run("console about to panic\npanic")


def test_a_sysrq_reset_is_a_crash_at_once_not_a_stall(sim: Simulation) -> None:
    machine = sim.machine("fake")
    started = time.monotonic()
    with pytest.raises(MachineCrashed, match=r"the guest rebooted \(sysrq reset"):
        machine.run("reset")
    assert time.monotonic() - started < sim.wall_timeout / 2
    assert not machine.alive


def test_a_guest_that_stops_time_is_stalled_within_the_wall_budget(sim: Simulation) -> None:
    machine = sim.machine("fake")
    sim.advance(1.25)
    with pytest.raises(MachineStalled) as stalled:
        machine.run("spin")
    assert not machine.alive
    assert stalled.value.now_ns == sim.now_ns
    assert stalled.value.now == sim.now >= 1.25
    assert f"stalled at {format_ns(sim.now_ns)} for" in str(stalled.value)


def test_a_guest_that_creeps_is_stopped_by_the_wall_budget(sim: Simulation) -> None:
    machine = sim.machine("fake")
    sim.wall_timeout = 1.0
    # 1 us of virtual time per ms of wall time: 1000x slower than real time, never still.
    machine.start("creep 1000 1000")
    began, started = sim.now_ns, time.monotonic()
    with pytest.raises(MachineStalled) as crept:
        sim.advance(0.05)  # the wall budget: 1 s + 10 x 0.05 s
    wall = time.monotonic() - started
    assert 1.5 <= wall < 1.5 + 2
    assert 0 < crept.value.now_ns - began < seconds_to_ns(0.05)
    assert re.fullmatch(r"virtual time advanced 0\.00\d s in 1\.\d s of wall time \(\d+x slower "
                        r"than real time\): the kernel is spinning \(a soft lockup\?\)",
                        crept.value.what), crept.value.what
    assert not machine.alive
    with pytest.raises(MachineCrashed, match="the kernel is spinning"):
        machine.run("echo late")
    assert sim.machine("next").run("echo on").stdout == b"on\n"


def test_a_creeping_guest_times_out_at_the_exact_virtual_deadline(sim: Simulation) -> None:
    machine = sim.machine("fake")
    # 1 ms of virtual time per ms of wall time: slow, but well inside the wall budget.
    began = sim.now_ns
    with pytest.raises(CommandTimeout) as timed_out:
        machine.run("creep 1000000 1000", timeout=0.05)
    # The agent cannot end a command that holds the CPU; the host's deadline (a second
    # after the guest's) is kept exactly once the kernel's clock reaches it.
    assert timed_out.value.now_ns == sim.now_ns == began + seconds_to_ns(1.05)
    assert not machine.alive


def test_elapsed_gives_seconds_and_exact_nanoseconds(sim: Simulation) -> None:
    sim.machine("fake")
    sim.advance(0.5)
    with sim.elapsed(exactly=1.5) as block:
        sim.advance(1.5)
    assert (block.start_ns, block.end_ns, block.duration_ns) == (
        sim.now_ns - seconds_to_ns(1.5), sim.now_ns, seconds_to_ns(1.5))
    assert (block.start, block.end, block.duration) == (sim.now - 1.5, sim.now, 1.5)
    short = r"took 0\.000000000 s .* expected at least 1 s"
    with pytest.raises(AssertionError, match=short), sim.elapsed(at_least=1):
        pass


def test_a_runs_stop_gives_seconds_and_exact_nanoseconds(sim: Simulation,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(units, "_warned", set())
    sim.machine("fake")
    stop = sim.advance(1.25)
    assert stop.reason is StopReason.DEADLINE and stop.time_ns == sim.now_ns
    with pytest.warns(UnitChangedWarning, match=r"RunStop\.time .* use RunStop\.time_ns"):
        assert stop.time == sim.now  # seconds now; it was nanoseconds
    exact = sim.advance(seconds_ns=1)
    assert exact.time_ns == stop.time_ns + 1
    assert sim.run_until(deadline=sim.now + 0.5).time_ns == exact.time_ns + seconds_to_ns(0.5)
    with pytest.raises(TypeError, match=r"give deadline= \(seconds\) or deadline_ns="):
        sim.run_until(deadline=1.0, deadline_ns=1)
    with pytest.raises(ValueError, match="seconds= must be a number of virtual seconds"):
        sim.advance(-1)
    with pytest.raises(ValueError, match=r"seconds= .* got nan"):
        sim.advance(float("nan"))


def test_console_lines_carry_their_virtual_time(sim: Simulation) -> None:
    machine = sim.machine("fake")
    started = machine.run("sleep 2\nconsole marker-7").started_ns
    found = machine.expect(r"marker-(\d)", timeout=1)
    assert found.group(1) == "7"
    assert found.time_ns - started == seconds_to_ns(2)


def test_machines_interleave_on_one_clock(sim: Simulation) -> None:
    one, two = sim.machine("one", boot=False), sim.machine("two", boot=False)
    sim.boot(one, two)
    jobs = [one.start("sleep 1\nconsole one-1\nsleep 1\nconsole one-2"),
            two.start("sleep 0.5\nconsole two-1\nsleep 1\nconsole two-2")]
    for job in jobs:
        job.wait()
    seen = sorted((line.time, line.text.strip()) for m in (one, two) if m.console
                  for line in m.console.lines if line.text.strip()[:4] in ("one-", "two-"))
    assert [text for _, text in seen] == ["two-1", "one-1", "two-2", "one-2"]


def test_poweroff_and_close_leave_no_process(sim: Simulation) -> None:
    machine = sim.machine("fake")
    assert machine.process is not None and machine.process.pid is not None
    pid = machine.process.pid
    machine.poweroff()
    sim.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_kernel_that_cannot_run_is_a_boot_error_naming_the_machine(tmp_path: Path) -> None:
    script = tmp_path / "linux"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    with Simulation(kernel=script, directory=tmp_path / "sim", deterministic=False) as sim, \
            pytest.raises(BootError, match=r"^web: kernel .*/linux: .*is not an ELF") as error:
        sim.machine("web")
    assert error.value.machine == "web"


def test_host_processes_that_outlive_sigkill_are_a_machine_error(
        sim: Simulation, monkeypatch: pytest.MonkeyPatch) -> None:
    machine = sim.machine("fake")

    def survivors(pid: int, **_: object) -> list[int]:
        raise KillError([pid])

    with monkeypatch.context() as patched:
        patched.setattr(machine_module, "kill_process_tree", survivors)
        with pytest.raises(MachineError, match=r"^fake: its host processes survived SIGKILL: "
                                               r"\[\d+\] \(at virtual time"):
            machine.kill()
