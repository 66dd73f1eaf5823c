"""Confinement is on unless turned off: a host that refuses the namespaces it needs gets
a clear error naming the way on, never machines silently unconfined.

tests/no_namespaces.py makes such a host: a seccomp filter refuses unshare(2) to a child
pytest run, as container runtimes and distributions that restrict user namespaces do.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

WRAPPER = Path(__file__).with_name("no_namespaces.py")
MACHINE_TEST = """
    def test_machine(umtt_machine):
        assert umtt_machine.run("echo ok").output.strip() == "ok"
        assert umtt_machine.sim.confined is {confined}
"""


def run_without_namespaces(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """A child pytest run on a host where unshare(2) is refused."""
    return pytester.run(sys.executable, str(WRAPPER), sys.executable, "-m", "pytest",
                        f"--basetemp={pytester.path / 'basetemp'}", *args)


def test_a_simulation_on_a_host_without_namespaces_is_an_error(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    result = pytester.run(sys.executable, str(WRAPPER), sys.executable, "-c",
                          "from pytest_umtt import Simulation; Simulation()")
    assert result.ret != 0
    result.stderr.fnmatch_lines([
        "pytest_umtt.errors.ConfinementError: machines cannot be confined on this host: "
        "*unshare(*): Operation not permitted. Unconfined, a guest can write any file the "
        "user running pytest can write. Allow the namespaces*, or accept that risk with "
        "--umtt-confine=off (Simulation(confine=False))"])


def test_the_plugin_says_so_in_the_header_and_fails_the_test(
        pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile(MACHINE_TEST.format(confined=True))
    result = run_without_namespaces(pytester, *kernel_args)
    result.stdout.fnmatch_lines([
        "umtt: machines cannot be confined on this host (*Operation not permitted): tests "
        "that boot one will fail",
        "E *pytest_umtt.errors.ConfinementError: machines cannot be confined on this host:*",
    ])
    result.assert_outcomes(errors=1)


def test_confinement_off_is_a_choice_the_header_states(
        pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile(MACHINE_TEST.format(confined=False))
    result = run_without_namespaces(pytester, *kernel_args, "--umtt-confine=off")
    result.stdout.fnmatch_lines(["umtt: machines NOT confined (--umtt-confine=off): a guest "
                                 "can write what the user running pytest can write"])
    result.assert_outcomes(passed=1)


def test_the_header_says_machines_are_confined(pytester: pytest.Pytester,
                                               kernel_args: list[str]) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*kernel_args)
    result.stdout.fnmatch_lines(["umtt: machines confined to their own directories (private "
                                 "mount namespace, host read-only)"])


def test_a_confine_value_that_is_neither_on_nor_off(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--umtt-confine=maybe")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--umtt-confine: expected on or off, got 'maybe'"])
