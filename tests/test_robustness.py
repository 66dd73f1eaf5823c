"""Hostile guests and careless users: nothing hangs, nothing leaks, nothing escapes.

Each test bounds its own wall time where a regression would otherwise hang (a child
process with a timeout, or a wall budget the harness must keep)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pytest_umtt.errors import (
    BootError,
    CommandTimeout,
    KernelError,
    MachineCrashed,
    MachineError,
    UmttError,
)
from pytest_umtt.kernel import build_shim
from pytest_umtt.rootfs import Rootfs
from pytest_umtt.simulation import Simulation, remove_stale_directories
from pytest_umtt.uml.console import Console
from pytest_umtt.uml.machine import POWEROFF_WALL_TIMEOUT, Machine
from tests.conftest import uml_processes


@pytest.fixture(autouse=True)
def _real_cache(real_cache: Path) -> None:
    """Child pytest runs use the built kernel, shim and root, not an empty cache."""


# --- console -----------------------------------------------------------------------------

def test_console_search_reads_only_from_the_line_asked_for(tmp_path: Path) -> None:
    console = Console(tmp_path / "log")
    console.feed(b"one\ntwo\nthr", 5)
    console.feed(b"ee\nfour\n", 7)
    assert console.text == "one\ntwo\nthree\nfour\n"
    found = console.search(re.compile("t[a-z]+"), 4)
    assert found is not None
    base, match = found
    assert (base + match.start(), match.group()) == (4, "two")
    assert console.time_at(base + match.start()) == 5
    later = console.search(re.compile("three"), console.text.index("three"))
    assert later is not None and console.time_at(later[0] + later[1].start()) == 7
    assert console.search(re.compile("one"), 1) is None
    console.close()


# --- commands ----------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e300, 1e-12])
def test_a_meaningless_timeout_is_refused(machine: Machine, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a number of virtual seconds"):
        machine.run("true", timeout=timeout)
    assert machine.run("true").ok  # nothing was submitted


@pytest.mark.kernel
def test_a_command_that_outlives_its_budget_is_killed_and_its_machine_goes_on(
        sim: Simulation) -> None:
    stuck = sim.machine("stuck", default_timeout=5)
    with pytest.raises(CommandTimeout, match="the machine runs the next command"):
        stuck.run("sleep 100")
    assert stuck.alive
    assert stuck.run("true").ok


@pytest.mark.kernel
def test_commands_with_a_timeout_run_under_bash(machine: Machine) -> None:
    assert machine.run("echo {1..3}", timeout=5).output == "1 2 3\n"
    assert machine.run("echo {1..3}").output == "1 2 3\n"


@pytest.mark.kernel
def test_teardown_of_a_guest_polling_the_clock_is_bounded(sim: Simulation) -> None:
    poller = sim.machine("poller")
    # As after a host-side abort: the agent is stuck in a command that reads the clock
    # (virtual time crawls) and never ends.
    poller._submit("while :; do : $EPOCHREALTIME; done", None, None, None, background=False)
    sim.advance(0.001)
    started = time.monotonic()
    poller.close()
    assert time.monotonic() - started < POWEROFF_WALL_TIMEOUT + 5
    assert not poller.alive


@pytest.mark.kernel
def test_a_kernel_that_exits_at_boot_is_reported_at_once(tmp_path: Path) -> None:
    impostor = tmp_path / "linux"
    impostor.write_bytes(Path("/bin/true").read_bytes() + b"\0time-travel=ext:\0")
    impostor.chmod(0o755)
    waits = []
    for attempt in range(5):
        with Simulation(kernel=impostor, directory=tmp_path / f"sim{attempt}",
                        wall_timeout=60) as simulation:
            started = time.monotonic()
            with pytest.raises(BootError, match="exited before connecting"):
                simulation.machine("quick")
            waits.append(time.monotonic() - started)
    assert max(waits) < 10, waits  # not the 60 s wall budget


@pytest.mark.kernel
def test_a_guest_reboot_is_reported_at_once(sim: Simulation) -> None:
    rebooter = sim.machine("rebooter")
    started = time.monotonic()
    with pytest.raises(MachineCrashed, match="the guest rebooted"):
        rebooter.run("reboot -f")
    assert time.monotonic() - started < sim.wall_timeout


@pytest.mark.kernel
def test_a_sysrq_reset_is_reported_at_once(sim: Simulation) -> None:
    resetter = sim.machine("resetter")
    started = time.monotonic()
    with pytest.raises(MachineCrashed, match=r"the guest rebooted \(sysrq reset") as crashed:
        resetter.run("echo b > /proc/sysrq-trigger")
    assert time.monotonic() - started < sim.wall_timeout / 2
    assert "sysrq: Resetting" in crashed.value.what  # the line, with its virtual time
    assert not resetter.alive


@pytest.mark.kernel
def test_reboot_on_the_pinned_root_is_reported_at_once(uml_kernel: Path, rootfs: Rootfs,
                                                       tmp_path: Path) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs, directory=tmp_path / "sim") as sim:
        rebooter = sim.machine("rebooter")
        if not rebooter.run("command -v reboot").ok:
            pytest.skip("the pinned root has no reboot binary (a sysrq reset is tested above)")
        started = time.monotonic()
        with pytest.raises(MachineCrashed, match="the guest rebooted"):
            rebooter.run("reboot -f")
        assert time.monotonic() - started < sim.wall_timeout / 2


FLOOD = """
import sys, time
from pytest_umtt.errors import MachineStalled
from pytest_umtt.simulation import Simulation
with Simulation(kernel=sys.argv[1], directory=sys.argv[2], wall_timeout=3) as sim:
    flooder = sim.machine("flooder")
    flooder.start("while :; do echo flood > /dev/kmsg; done")
    started = time.monotonic()
    try:
        sim.advance(1)
    except MachineStalled as exc:
        print(f"stalled after {time.monotonic() - started:.1f} s: {exc.what}")
"""


@pytest.mark.kernel
def test_a_console_flood_is_a_stall_not_a_hang(uml_kernel: Path, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", FLOOD, str(uml_kernel), str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.match(r"stalled after \d+\.\d s: virtual time stalled", done.stdout), done.stdout
    assert float(done.stdout.split()[2]) < 3 + 5
    assert not uml_processes(tmp_path)
    assert not (tmp_path / "s" / "flooder").exists()
    assert not (tmp_path / "s" / "time.sock").exists()


# --- the guest's directory ---------------------------------------------------------------

@pytest.mark.kernel
def test_files_reach_the_guest_and_come_back(machine: Machine, tmp_path: Path) -> None:
    tool = tmp_path / "tool.sh"
    tool.write_text("#!/bin/bash\necho from-the-host \"$@\" > /mnt/out.txt\n")
    tool.chmod(0o755)
    assert machine.push(tool) == "/mnt/tool.sh"
    assert machine.run("/mnt/tool.sh 42").ok
    assert machine.pull("/mnt/out.txt") == b"from-the-host 42\n"
    with pytest.raises(MachineError, match="exists already"):
        machine.push(tool)


@pytest.mark.kernel
def test_links_the_guest_plants_are_never_followed(machine: Machine, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("host only\n")
    machine.push(secret, "planted-source")
    # The next commands' directory, and the polling agent's go-file or the next
    # directory, planted ahead.
    third = "cmd/3" if machine.agent_console else "cmd/3.go"
    result = machine.run(f"ln -s {secret} /mnt/link && rm /mnt/planted-source "
                         f"&& ln -s /tmp /mnt/cmd/2 && ln -s {secret} /mnt/{third}")
    assert result.ok, result.stderr
    with pytest.raises(MachineError, match=r"cannot read /mnt/link"):
        machine.pull("/mnt/link")
    for _ in ("cmd/2 is a link to a directory", f"{third} is a link to a host file"):
        with pytest.raises(MachineError, match="the guest changed its command directory"):
            machine.run("echo written > /dev/null")
    assert secret.read_text() == "host only\n"
    assert not list(Path("/tmp").glob("command"))


@pytest.mark.kernel
def test_a_guest_that_replaces_its_result_files_gets_a_clear_error(machine: Machine) -> None:
    with pytest.raises(MachineError, match=r"the guest removed or replaced /mnt/cmd/1"):
        machine.run("rm -rf /mnt/cmd/1; mkdir /mnt/cmd/1")


# --- leaks -------------------------------------------------------------------------------

SPINNING_TEST = """
def test_spin(umtt_machine):
    print("spinning", flush=True)
    umtt_machine.run("while :; do : $EPOCHREALTIME; done")
"""


def run_pytest_and_signal(pytester: pytest.Pytester, kernel: Path, signum: int,
                          tmp: Path) -> subprocess.Popen[str]:
    pytester.makepyfile(SPINNING_TEST)
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-s", "-p", "no:cacheprovider",
                             f"--uml-kernel={kernel}", "--umtt-rootfs=host"],
                            cwd=pytester.path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "spinning" in line:
            break
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    return proc


@pytest.mark.kernel
def test_sigterm_tears_everything_down(pytester: pytest.Pytester, uml_kernel: Path,
                                       tmp_path: Path) -> None:
    run_pytest_and_signal(pytester, uml_kernel, signal.SIGTERM, tmp_path)
    assert not uml_processes(tmp_path)
    assert not list(tmp_path.glob("umtt-*"))


@pytest.mark.kernel
def test_sigkill_leaves_no_process_and_the_next_session_sweeps(
        pytester: pytest.Pytester, uml_kernel: Path, tmp_path: Path) -> None:
    run_pytest_and_signal(pytester, uml_kernel, signal.SIGKILL, tmp_path)
    deadline = time.monotonic() + 10  # the kernel delivers the parent-death signal
    while uml_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not uml_processes(tmp_path)
    left = list(tmp_path.glob("umtt-*"))
    assert left, "a SIGKILLed session cannot clean up: its directory is the sweep's job"
    assert remove_stale_directories(tmp_path) == left
    assert not list(tmp_path.glob("umtt-*"))


def test_a_failing_shim_build_leaves_no_directory(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("UMTT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KernelError, match="compiling the getrandom shim failed"):
        Simulation()
    assert not list(tmp_path.glob("umtt-*"))


def test_a_read_only_cache_with_the_shim_built_is_usable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    built = build_shim()
    assert built is not None

    def refuse(path: Path) -> Path:
        raise KernelError(f"{path} is read-only")

    monkeypatch.setattr("pytest_umtt.kernel.writable_dir", refuse)
    assert build_shim() == built


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--umtt-virtual-timeout=nan"], ["--umtt-virtual-timeout=inf"],
    ["--umtt-virtual-timeout=1e300"], ["--umtt-wall-timeout=nan"],
    ["--umtt-cmdline=a \"b"], ["--umtt-rootfs=disk"],
])
def test_bad_options_are_usage_errors(pytester: pytest.Pytester, args: list[str]) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: *"])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize("marker", ["umtt_machine(mem=5)", "umtt_machine(cmdline=5)",
                                    "umtt_virtual_timeout(float('nan'))",
                                    "umtt_wall_timeout(-1)"])
def test_bad_markers_are_usage_errors(pytester: pytest.Pytester, marker: str) -> None:
    pytester.makepyfile(f"import pytest\n@pytest.mark.{marker}\ndef test_x(): pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines(["ERROR: *test_x*marker*"])


@pytest.mark.kernel
def test_a_relative_kernel_path_works(pytester: pytest.Pytester, uml_kernel: Path) -> None:
    (pytester.path / "linux").symlink_to(uml_kernel)
    pytester.makepyfile("def test_x(umtt_machine): assert umtt_machine.run('true').ok")
    result = pytester.runpytest_subprocess("--uml-kernel=./linux")
    result.assert_outcomes(passed=1)


@pytest.mark.kernel
def test_a_kunit_machine_that_cannot_boot_is_an_error_item(pytester: pytest.Pytester,
                                                           uml_kernel: Path) -> None:
    pytester.makepyfile("def test_ordinary(): pass")
    result = pytester.runpytest_subprocess(f"--uml-kernel={uml_kernel}", "--umtt-kunit=*",
                                           "--umtt-mem=8M")
    assert "INTERNALERROR" not in result.stdout.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 1 and outcomes.get("failed", 0) >= 1, outcomes
    # A KUnit machine boots the host's root (its cases run before userspace): the kernel
    # itself refuses 8M, and the item shows why.
    result.stdout.fnmatch_lines(["*kunit: boot*", "the KUnit machine did not come up: kunit: "
                                 "the kernel exited before connecting to the calendar*",
                                 "*Too few physical memory! Needed=*, given=8388608*"])


def test_an_unusable_tmpdir_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    with pytest.raises(UmttError, match=r"cannot make a simulation directory in .*missing "
                                        r"\(TMPDIR=.*missing\)"):
        Simulation()


@pytest.mark.kernel
def test_an_unwritable_artifacts_directory_leaves_nothing(pytester: pytest.Pytester,
                                                         kernel_args: list[str],
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    pytester.makepyfile("def test_x(umtt_machine): assert umtt_machine.run('true').ok")
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-artifacts=/proc/umtt")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*/proc/umtt*"])
    assert not list(tmp_path.glob("umtt-*"))
