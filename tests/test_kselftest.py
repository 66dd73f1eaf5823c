"""kselftests as pytest items: the installed tree, budgets in virtual and wall time, and
what a user sees for each way a kselftest can end (tests with the real kernel use
pytester, each kselftest in its own machine)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pytest_umtt.errors import KselftestError
from pytest_umtt.kselftest import (
    DEFAULT_TIMEOUT,
    KselftestTest,
    build_kselftests,
    collection_timeout,
    guest_command,
    read_tests,
    slow_diagnosis,
    virtual_budget,
)

SCRIPTS = {
    # KTAP as kselftest.h prints it: two subtests, one skipped.
    "ktap.sh": "echo 'TAP version 13'; echo '1..2'; echo '# about to check'; "
               "echo 'ok 1 first check'; echo 'ok 2 second check # SKIP no such device'",
    "skip.sh": "echo '# needs hardware we do not have'; exit 4",
    "fail.sh": "echo 'TAP version 13'; echo '1..1'; echo '# expected 1, got 2'; "
               "echo 'not ok 1 arithmetic'; exit 1",
    "sleeper.sh": "sleep 100",  # its collection's settings allow 5 s
    "poller.sh": "while :; do : \"$EPOCHREALTIME\"; done",  # every read: a clock read
    "spinner.sh": "echo 'spinning'; while :; do :; done",  # no system call at all
    "crasher.sh": "echo c > /proc/sysrq-trigger",
    "after.sh": "uptime >/dev/null && echo 'this machine is fresh'",
}


def make_tree(root: Path, listing: list[str], timeouts: dict[str, int]) -> Path:
    """An installed kselftest tree of shell scripts (what `make install` lays out)."""
    for line in listing:
        collection, name = line.split(":")
        (root / collection).mkdir(parents=True, exist_ok=True)
        script = root / collection / name
        script.write_text(f"#!/bin/bash\n{SCRIPTS[name]}\n")
        script.chmod(0o755)
    for collection, seconds in timeouts.items():
        (root / collection / "settings").write_text(f"timeout={seconds}\n")
    (root / "kselftest-list.txt").write_text("".join(f"{line}\n" for line in listing))
    return root


# --- the tree and its budgets, without a kernel -------------------------------------------

def test_the_list_names_the_tests_in_order(tmp_path: Path) -> None:
    make_tree(tmp_path, ["demo:ktap.sh", "other:skip.sh"], {})
    assert read_tests(tmp_path) == [KselftestTest("demo", "ktap.sh"),
                                    KselftestTest("other", "skip.sh")]


@pytest.mark.parametrize("line", ["no-colon", ":name", "../up:x"])
def test_a_bad_list_line_is_an_error_naming_it(tmp_path: Path, line: str) -> None:
    (tmp_path / "kselftest-list.txt").write_text(f"demo:ok\n{line}\n")
    with pytest.raises(KselftestError, match=f"kselftest-list.txt:2: .*{line!r}"):
        read_tests(tmp_path)


def test_a_directory_without_a_list_is_no_tree(tmp_path: Path) -> None:
    with pytest.raises(KselftestError, match="not an installed kselftest tree"):
        read_tests(tmp_path)


def test_budgets_follow_run_kselftest_sh(tmp_path: Path) -> None:
    make_tree(tmp_path, ["plain:ktap.sh", "long:sleeper.sh", "free:skip.sh"],
              {"long": 300, "free": 0})
    plain, long, free = read_tests(tmp_path)
    assert collection_timeout(tmp_path, "plain") is None
    assert virtual_budget(tmp_path, plain, None) == DEFAULT_TIMEOUT == 45
    assert virtual_budget(tmp_path, long, None) == 300
    assert virtual_budget(tmp_path, free, None) is None  # timeout=0: no kselftest limit
    assert virtual_budget(tmp_path, free, 7.5) == virtual_budget(tmp_path, long, 7.5) == 7.5


def test_the_guest_runs_a_test_in_its_directory_with_stderr_and_line_buffering() -> None:
    command = guest_command(KselftestTest("net/forwarding", "a b.sh"), "/mnt/kselftest")
    assert command == ("cd /mnt/kselftest/net/forwarding && exec stdbuf -oL -eL ./'a b.sh' 2>&1")


def test_a_slow_test_is_diagnosed_with_both_clocks() -> None:
    text = slow_diagnosis(2_200_000_000, 300.0, 45)
    assert text.startswith("virtual time advanced 2.200 s in 300.0 s of wall time: a loop "
                           "that polls the clock, running 136x slower than real time (its "
                           "budget of 45 virtual s would take 102 min of wall time)")
    assert "256 ns" in text


# --- with the real kernel ---------------------------------------------------------------

@pytest.fixture
def kernel_args(kernel_args: list[str]) -> list[str]:
    return [*kernel_args, "-v", "-rs"]


@pytest.mark.kernel
def test_tests_and_ktap_subtests_become_items(pytester: pytest.Pytester,
                                              kernel_args: list[str]) -> None:
    tree = make_tree(pytester.path / "tree", ["demo:ktap.sh", "demo:skip.sh", "demo:fail.sh",
                                              "slow:sleeper.sh"], {"slow": 5})
    result = pytester.runpytest_subprocess(*kernel_args, f"--umtt-kselftest={tree}")
    result.stdout.fnmatch_lines_random([
        "*kselftest::demo:ktap.sh PASSED*",
        "*kselftest::demo:ktap.sh SUBPASSED[[]first check[]]*",
        "*kselftest::demo:ktap.sh SUBSKIPPED[[]second check[]] (no such device)*",
        "*SKIPPED* *no such device",
        "*SKIPPED* *exit status 4 (skip): needs hardware we do not have",
        "*kselftest::demo:fail.sh SUBFAILED[[]arithmetic[]]*",
        "*kselftest demo:fail.sh/arithmetic: # expected 1, got 2",
        "*kselftest demo:fail.sh: fail: exit status 1",
        "*kselftest slow:sleeper.sh: timeout: killed at its budget of 5 s of virtual time*",
        "(5.0* s virtual, * s wall)",
    ])
    # A subtest counts as a result of its own: "1 subtests passed" beside these.
    result.assert_outcomes(passed=1, skipped=2, failed=3)
    result.stdout.fnmatch_lines(["* 1 subtests passed in *"])


@pytest.mark.kernel
def test_stuck_tests_are_diagnosed_within_the_wall_budget(pytester: pytest.Pytester,
                                                         kernel_args: list[str]) -> None:
    tree = make_tree(pytester.path / "tree", ["stuck:poller.sh", "stuck:spinner.sh",
                                              "stuck:crasher.sh", "stuck:after.sh"], {})
    result = pytester.runpytest_subprocess(*kernel_args, f"--umtt-kselftest={tree}",
                                           "--umtt-kselftest-wall-timeout=3",
                                           "--durations=0")
    result.stdout.fnmatch_lines_random([
        "*kselftest stuck:poller.sh: slow: virtual time advanced 0.* s in 3.* s of wall "
        "time: a loop that polls the clock, running *x slower than real time (its budget "
        "of 45 virtual s would take * min of wall time)*",
        "*kselftest stuck:spinner.sh: stall: virtual time stood still at * for 3.0 s of "
        "wall time: a busy loop*",
        "spinning",  # what it printed before it spun
        "*kselftest stuck:crasher.sh: crash: the kernel crashed: kernel panic*sysrq*",
        "*kselftest::stuck:after.sh PASSED*",  # a fresh machine after the crash
    ])
    result.assert_outcomes(passed=1, failed=3)


@pytest.mark.kernel
def test_a_real_kselftest_reports_each_subtest(pytester: pytest.Pytester,
                                               kernel_args: list[str]) -> None:
    missing = [tool for tool in ("make", "gcc", "rsync") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building kselftests needs {', '.join(missing)}")
    built = build_kselftests(["timers"], destructive=True)
    tree = pytester.path / "tree"
    (tree / "timers").mkdir(parents=True)
    shutil.copy2(built / "timers" / "nanosleep", tree / "timers")
    (tree / "kselftest-list.txt").write_text("timers:nanosleep\n")
    result = pytester.runpytest_subprocess(*kernel_args, f"--umtt-kselftest={tree}")
    result.stdout.fnmatch_lines_random([
        "*kselftest::timers:nanosleep PASSED*",
        "*kselftest::timers:nanosleep SUBPASSED[[]CLOCK_MONOTONIC[]]*"])
    result.stdout.fnmatch_lines_random(["*SKIPPED* *CLOCK_PROCESS_CPUTIME_ID"])
    result.assert_outcomes(passed=1, skipped=6)
    result.stdout.fnmatch_lines(["* 6 subtests passed in *"])


def test_a_directory_without_a_list_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(f"--umtt-kselftest={pytester.path}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--umtt-kselftest: * is not an installed kselftest tree*"])
