"""Machines on real UML kernels: commands, console, several machines, crashes, teardown."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_umtt.errors import (
    BootError,
    CommandTimeout,
    ExpectTimeout,
    MachineCrashed,
    MachineStalled,
)
from pytest_umtt.simulation import Simulation
from pytest_umtt.uml.machine import Machine, MachineState
from pytest_umtt.units import seconds_to_ns
from tests.conftest import uml_processes

pytestmark = pytest.mark.kernel


# --- commands --------------------------------------------------------------------------

def test_run_returns_status_and_separate_byte_exact_output(machine: Machine) -> None:
    result = machine.run("printf 'out\\000\\377'; printf 'err\\n' >&2; exit 7")
    assert result.status == 7
    assert result.stdout == b"out\x00\xff"
    assert result.stderr == b"err\n"
    assert result.started <= result.ended


def test_run_with_env_and_cwd(machine: Machine) -> None:
    result = machine.run('echo "$GREETING" $(pwd)', env={"GREETING": "hi there"}, cwd="/usr")
    assert result.output == "hi there /usr\n"


def test_sleep_takes_exact_virtual_time(machine: Machine, sim: Simulation) -> None:
    before = sim.now_ns
    result = machine.run("sleep 3600")
    assert 3600 <= result.duration <= 3600.001
    assert seconds_to_ns(3600) <= sim.now_ns - before <= seconds_to_ns(3600.01)
    assert result.ended <= sim.now


@pytest.mark.parametrize("console", [True, False], ids=["console", "files"])
def test_a_command_past_its_timeout_is_killed_and_the_machine_goes_on(
        sim: Simulation, console: bool) -> None:
    machine = sim.machine("m", agent_console=console)
    assert (machine.agent_console is not None) is console
    submitted = sim.now_ns
    with pytest.raises(CommandTimeout, match="within 1 s of virtual time: killed") as timed_out:
        machine.run("echo started; echo half >&2; sleep 100", timeout=1)
    error = timed_out.value
    assert (error.command, error.timeout, error.stdout, error.stderr) == (
        "echo started; echo half >&2; sleep 100", 1.0, b"started\n", b"half\n")
    if console:  # killed at the instant the host asks
        assert error.now_ns - submitted == seconds_to_ns(1)
    else:  # by timeout(1) in the guest, 1 s after the agent started it
        assert seconds_to_ns(1) <= error.now_ns - submitted <= seconds_to_ns(1.1)
    assert machine.run("echo ok").output == "ok\n"


@pytest.mark.parametrize("console", [True, False], ids=["console", "files"])
def test_a_timed_out_command_dies_with_the_children_it_started(
        sim: Simulation, console: bool) -> None:
    machine = sim.machine("m", agent_console=console)
    stubborn = ("trap '' TERM; (trap '' TERM; sleep 1000) & echo $! >> /tmp/pids; "
                "sleep 1000 & echo $! >> /tmp/pids; echo $BASHPID >> /tmp/pids; wait")
    with pytest.raises(CommandTimeout):
        machine.run(stubborn, timeout=2)
    pids = machine.run("cat /tmp/pids").output.split()
    assert len(pids) == 3
    # Gone, or a zombie whose parent went first (init reaps it).
    alive = machine.run("for p in $(cat /tmp/pids); do s=$(cut -d' ' -f3 /proc/$p/stat "
                        "2>/dev/null) && [ \"$s\" != Z ] && echo $p; done; true")
    assert alive.output == ""
    assert machine.run("echo ok").output == "ok\n"


def test_command_that_never_ends_is_killed_at_the_default_budget(sim: Simulation) -> None:
    sleeper = sim.machine("sleeper", default_timeout=600)
    start = sim.now_ns
    with pytest.raises(CommandTimeout, match="did not finish within 600 s of virtual time"
                       ) as timed_out:
        sleeper.run("sleep infinity")
    assert timed_out.value.now_ns - start == seconds_to_ns(600)
    assert sleeper.run("true").ok


def test_background_command_and_foreground_meanwhile(machine: Machine, sim: Simulation) -> None:
    job = machine.start("sleep 5; echo slept")
    assert not job.done
    quick = machine.run("echo quick")
    assert quick.output == "quick\n" and quick.started - job.started < 1
    result = job.wait(timeout=10)
    assert result.output == "slept\n"
    assert 5 <= result.duration <= 5.001
    after = machine.run("true")  # the agent is woken as the background job ends
    assert after.started_ns - result.ended_ns < 10**6


# --- console -----------------------------------------------------------------------------

def test_expect_finds_kernel_output_at_its_virtual_time(machine: Machine, sim: Simulation) -> None:
    start = sim.now_ns
    machine.start("sleep 2; echo marker-42 > /dev/kmsg")
    found = machine.expect(r"marker-(\d+)", timeout=5)
    assert found.group(1) == "42"
    two = seconds_to_ns(2)
    assert two <= found.time_ns - start <= two + sim.console_resolution_ns


def test_expect_timeout_is_exact_and_shows_the_console(machine: Machine, sim: Simulation) -> None:
    start = sim.now_ns
    with pytest.raises(ExpectTimeout) as failure:
        machine.expect("never printed", timeout=1.5)
    assert sim.now_ns - start == seconds_to_ns(1.5)
    message = str(failure.value)
    assert "alpha" in message and "console tail" in message and "console.log" in message


def test_console_output_stays_blocking_apart_from_input(machine: Machine) -> None:
    # UML has no console write interrupt in time-travel modes: its output must block.
    # Enabling the input IRQ sets O_NONBLOCK on fd 0's open file description, which
    # must not be the one fd 1 (and UML's blocking dup of it) uses.
    assert machine.process is not None
    pid = machine.process.pid

    def flags(fd: int) -> int:
        for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
        raise AssertionError(f"no flags for fd {fd}")

    assert flags(0) & os.O_NONBLOCK
    assert not flags(1) & os.O_NONBLOCK
    assert not flags(2) & os.O_NONBLOCK


def test_large_console_writes_complete_and_the_machine_goes_on(machine: Machine) -> None:
    # Before the fix, about 3 in 4 such writes left the writer asleep in n_tty_write for
    # a wakeup that never came, and the agent with it.
    size = 1 << 20
    for _ in range(3):
        result = machine.run(f"head -c {size} /dev/zero | tr '\\0' x > /dev/console",
                             timeout=30)
        assert result.ok
    assert machine.run("echo alive", timeout=5).stdout == b"alive\n"
    assert machine.console is not None
    assert machine.console.text.count("x" * 4096) >= 3 * size // 4096 - 3


def test_command_output_never_mixes_with_kernel_messages(machine: Machine) -> None:
    result = machine.run("echo noise > /dev/kmsg; echo clean")
    assert result.stdout == b"clean\n"


# --- several machines ------------------------------------------------------------------

def test_machines_booted_together_share_memory_and_interleave(sim: Simulation) -> None:
    one = sim.machine("one", boot=False)
    two = sim.machine("two", boot=False)
    sim.boot(one, two)
    assert one.client is not None and two.client is not None
    assert one.client.shm and two.client.shm
    # Each line carries the guest's clock, which reads the simulation's in every guest.
    jobs = [one.start('for i in 1 2 3; do sleep 1; echo "$EPOCHREALTIME one"; done'),
            two.start('sleep 0.5; for i in 1 2 3; do sleep 1; echo "$EPOCHREALTIME two"; done')]
    lines = [line.split() for job in jobs for line in job.wait(timeout=10).output.splitlines()]
    assert [name for _, name in sorted(lines, key=lambda line: float(line[0]))] == \
        ["one", "two"] * 3
    assert one.directory != two.directory


def test_late_joiner_is_served_over_messages(sim: Simulation) -> None:
    first = sim.machine("first")
    sim.advance(1.0)
    late = sim.machine("late")
    assert late.client is not None and not late.client.shm
    assert first.client is not None and first.client.shm
    result = late.run("sleep 2")
    assert 2 <= result.duration <= 2.001
    assert first.run("echo still here").output == "still here\n"


# --- crashes and hangs -------------------------------------------------------------------

def test_panic_raises_with_cause_and_others_go_on(sim: Simulation) -> None:
    victim = sim.machine("victim", boot=False)
    survivor = sim.machine("survivor", boot=False)
    sim.boot(victim, survivor)
    with pytest.raises(MachineCrashed) as failure:
        victim.run("echo c > /proc/sysrq-trigger")
    message = str(failure.value)
    assert "victim" in message and "kernel panic" in message and "sysrq" in message.lower()
    assert victim.state is MachineState.CRASHED and not victim.alive
    assert survivor.run("sleep 1; echo ok").output == "ok\n"
    with pytest.raises(MachineCrashed):
        victim.run("true")  # remembered: later calls fail with the same cause


@pytest.mark.parametrize("console", [True, False], ids=["console", "files"])
def test_a_machine_powers_off_and_its_kernel_exits_cleanly(sim: Simulation, console: bool) -> None:
    # The power-off removes the agent's console before the halt: an agent that exited
    # then made the kernel panic ("Attempted to kill init"), and a coverage kernel's
    # counts are written only by a process that exits, not by one that panics.
    machine = sim.machine("m", agent_console=console)
    assert machine.process is not None
    machine.poweroff()
    assert machine.state is MachineState.OFF
    status = machine.process.wait()
    machine.close()  # reads the console to its end
    assert machine.console is not None
    texts = [line.text for line in machine.console.lines]
    assert "reboot: Power down" in texts
    assert not [text for text in texts if "Kernel panic" in text], texts[-5:]
    assert status == 0, texts[-5:]


def test_init_that_exits_is_reported(sim: Simulation, tmp_path: Path) -> None:
    agent = tmp_path / "agent.sh"
    agent.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(MachineCrashed, match=r"the guest agent \(init\) exited"):
        sim.machine("quitter", agent=agent)


def test_busy_loop_is_stopped_by_the_wall_watchdog(sim: Simulation) -> None:
    spinner = sim.machine("spinner")
    sim.wall_timeout = 2.0
    with pytest.raises(MachineStalled, match=r"spinner: virtual time stalled at \d+\.\d{9} s "
                                             r"for 2\.\d s wall"):
        spinner.run("while :; do :; done")
    assert not spinner.alive


def test_a_kernel_spinning_with_preemption_off_is_stopped_by_the_wall_budget(
        sim: Simulation) -> None:
    lockup = sim.machine("lockup")
    sim.wall_timeout = 2.0
    started = time.monotonic()
    # LKDTM's SOFTLOCKUP spins in cpu_relax(), a 1 ns time step under time travel: the
    # clock creeps (never still for the stall detector) and the agent never runs to
    # kill the command at its timeout.
    with pytest.raises(MachineStalled, match=(
            r"(?s)lockup: virtual time advanced 0\.\d{3} s in \d+\.\d s of wall time \(\d+x "
            r"slower than real time\): the kernel is spinning \(a soft lockup\?\) \(at "
            r"virtual time 0\.\d{9} s\)\n.*lkdtm: Performing direct entry SOFTLOCKUP")):
        lockup.run("echo SOFTLOCKUP > /sys/kernel/debug/provoke-crash/DIRECT", timeout=0.05)
    # The wall budget: 2 s + 10 x the span to the run's deadline (the 0.05 s budget over
    # the console channel, which kills at that instant; 1.05 s with the files channel's
    # grace), a poll of 0.5 s, then the kill of the machine's process tree (at most 5 s).
    assert time.monotonic() - started < 2 + 10.5 + 0.5 + 5
    assert not lockup.alive
    with pytest.raises(MachineCrashed, match="the kernel is spinning"):
        lockup.run("true")
    assert sim.machine("after").run("echo on").output == "on\n"


def test_kernel_without_time_travel_fails_before_waiting(tmp_path: Path) -> None:
    debian = Path(os.path.realpath("/usr/bin/linux"))
    if not debian.exists():
        pytest.skip("Debian's user-mode-linux is not installed (.ci/run installs it)")
    with (Simulation(kernel=debian, directory=tmp_path / "sim") as simulation,
          pytest.raises(BootError, match="without time-travel=ext support")):
        simulation.machine("old")


# --- safety and teardown -----------------------------------------------------------------

def test_guest_cannot_write_host_files_outside_its_directory(machine: Machine,
                                                            tmp_path: Path) -> None:
    assert machine.sim.confined
    for path in ("/etc/umtt-probe", "/root/umtt-probe"):
        result = machine.run(f"touch {path}")
        assert result.status != 0, path
        assert not Path(path).exists()
    # Guest root tries harder: a read-write root, a fresh hostfs of any host path.
    up = "../" * 64
    attacks = {"remount": "mount -o remount,rw / && touch /etc/umtt-probe",
               "hostfs": f"mkdir -p /tmp/h && mount -t hostfs -o {up}{tmp_path} none /tmp/h "
                         f"&& touch /tmp/h/umtt-probe"}
    for name, attack in attacks.items():
        result = machine.run(attack)
        assert result.status != 0 and b"Read-only file system" in result.stderr, name
    assert not Path("/etc/umtt-probe").exists()
    assert not (tmp_path / "umtt-probe").exists()
    assert machine.run("touch /tmp/x /mnt/x && echo ok").output == "ok\n"
    assert (machine.directory / "x").exists()


def test_sockets_and_directories_are_private(sim: Simulation, machine: Machine) -> None:
    assert stat.S_IMODE(os.stat(sim.directory / "time.sock").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(machine.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sim.directory).st_mode) == 0o700


def test_nothing_is_left_after_a_crash(uml_kernel: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sim"
    fds_before = len(os.listdir("/proc/self/fd"))
    with Simulation(kernel=uml_kernel, directory=directory) as simulation:
        crasher = simulation.machine("c")
        with pytest.raises(MachineCrashed):
            crasher.run("echo c > /proc/sysrq-trigger")
    assert not uml_processes(directory)
    assert not (directory / "c").exists()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # sockets, memfds, ptys closed


INTERRUPTED = """
import sys
from pytest_umtt.simulation import Simulation
with Simulation(kernel=sys.argv[1], directory=sys.argv[2] + "/sim") as sim:
    m = sim.machine("busy")
    sim.wall_timeout = 600
    print("running", flush=True)
    m.run("while :; do :; done")
"""


def test_nothing_is_left_after_ctrl_c(uml_kernel: Path, tmp_path: Path) -> None:
    script = subprocess.Popen([sys.executable, "-c", INTERRUPTED, str(uml_kernel),
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    assert script.stdout is not None
    assert script.stdout.readline() == "running\n"
    script.send_signal(signal.SIGINT)
    _, err = script.communicate(timeout=30)
    assert "KeyboardInterrupt" in err
    assert not uml_processes(tmp_path)
    assert not (tmp_path / "sim" / "busy").exists()
    assert not (tmp_path / "sim" / "time.sock").exists()


def test_kernel_that_exits_before_connecting_is_a_boot_error(tmp_path: Path) -> None:
    impostor = tmp_path / "linux"
    impostor.write_bytes(Path("/bin/true").read_bytes() + b"\0time-travel=ext:\0")
    impostor.chmod(0o755)
    with (Simulation(kernel=impostor, directory=tmp_path / "sim") as simulation,
          pytest.raises(BootError, match="exited before connecting to the calendar")):
        simulation.machine("quick")
