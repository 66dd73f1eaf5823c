"""The pytest plugin, through pytester: options, markers, fixtures, hooks and reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_umtt.cache import cache_root
from pytest_umtt.ktap import parse_ktap
from pytest_umtt.plugin.suites import KunitBoot, crash_console, listed_cases
from pytest_umtt.uml.console import Console

pytestmark = pytest.mark.kernel


# --- settings -------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "message"), [
    (["--umtt-seed=abc"], "--umtt-seed: expected an integer seed or 'random', got 'abc'"),
    (["--umtt-mem=lots"], "--umtt-mem: expected a size like 64M or 1G, got 'lots'"),
    (["--umtt-wall-timeout=-3"], "--umtt-wall-timeout: expected a number of seconds above 0"),
    (["--uml-kernel=/nonexistent/linux"], "--uml-kernel: no kernel at '/nonexistent/linux'"),
    (["--umtt-bundle=sometimes", "--umtt-artifacts=a"],
     "--umtt-bundle: expected one of always, failed, never, got 'sometimes'"),
    (["--umtt-bundle=always"], "--umtt-bundle=always needs --umtt-artifacts=DIR"),
    (["--umtt-cpu=fast"], "--umtt-cpu: expected auto, off or a CPU number: got 'fast'"),
    (["--umtt-cpu=4096"], "--umtt-cpu: expected auto, off or a CPU number: CPU 4096 is not "
                          "one this process may use (allowed: *)"),
    (["--umtt-replay=nothing.umtt-bundle"], "--umtt-replay: no replay bundle at "
                                           "'nothing.umtt-bundle'"),
])
def test_bad_option_values_are_usage_errors(pytester: pytest.Pytester, args: list[str],
                                            message: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_precedence_marker_cli_env_ini(pytester: pytest.Pytester,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\numtt_seed = 11\numtt_mem = 96M\n")
    pytester.makepyfile("""
        import pytest
        from pytest_umtt.plugin import ITEM_SETTINGS

        def test_plain(request):
            s = request.node.stash[ITEM_SETTINGS]
            print("SETTINGS", s.seed, s.seed_source, s.mem)

        @pytest.mark.umtt_seed(99)
        def test_marked(request):
            s = request.node.stash[ITEM_SETTINGS]
            print("SETTINGS", s.seed, s.seed_source, s.mem)
    """)
    monkeypatch.setenv("UMTT_SEED", "22")
    result = pytester.runpytest_subprocess("-s", "--umtt-seed=33")
    result.stdout.fnmatch_lines(["*SETTINGS 33 --umtt-seed 96M*", "*SETTINGS 99 *marker 96M*"])
    result = pytester.runpytest_subprocess("-s")
    result.stdout.fnmatch_lines(["*SETTINGS 22 $UMTT_SEED 96M*"])
    monkeypatch.delenv("UMTT_SEED")
    result = pytester.runpytest_subprocess("-s")
    result.stdout.fnmatch_lines(["*SETTINGS 11 ini umtt_seed 96M*"])


def test_marker_with_unknown_argument_is_rejected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        @pytest.mark.umtt_machine(memory="1G")
        def test_x(): pass
    """)
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*::test_x: @pytest.mark.umtt_machine(mem=None, cmdline=None, "
                                 "kernel=None) got () {'memory': '1G'}"])


def test_header_names_kernel_and_seed(pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-seed=5")
    result.stdout.fnmatch_lines(["umtt: kernel *linux",
                                 "      Linux version 6.12* #1 1970-01-01 * (sha256:*)",
                                 "      from linux-source-6.12 6.12.*, built with pytest-umtt's "
                                 "patches: 0001-* 0002-*",
                                 "umtt: guest root pinned sha256:* (* Debian packages: libc6 *"
                                 ", bash *, ...)",
                                 "      */rootfs.cpio",
                                 "umtt: seed 5 (--umtt-seed), guest entropy seeded by the "
                                 "getrandom shim"])


# --- fixtures and assertions -------------------------------------------------------------

def test_fixtures_and_virtual_time_assertions(pytester: pytest.Pytester,
                                              kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        import pytest

        def test_sleep(umtt_machine, umtt_sim):
            with umtt_sim.elapsed(at_least=3, at_most=3.001):
                assert umtt_machine.run("sleep 3").duration == pytest.approx(3, abs=1e-3)

        def test_too_slow(umtt_machine, umtt_sim):
            with umtt_sim.elapsed(at_most=1):
                umtt_machine.run("sleep 2")

        def test_two(umtt_machine_factory, umtt_sim):
            a, b = umtt_machine_factory("a", boot=False), umtt_machine_factory("b", boot=False)
            umtt_sim.boot(a, b)
            assert a.run("hostname").output == "a\\n"
            assert b.run("hostname").output == "b\\n"
    """)
    result = pytester.runpytest_subprocess(*kernel_args)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*the block took 2.00* s of virtual time, expected at most 1 s*",
        "*3 simulations: * s of virtual time in * s wall (*x)*",
    ])


def test_module_scoped_machine_boots_once(pytester: pytest.Pytester,
                                          kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        def test_one(umtt_module_machine):
            umtt_module_machine.run("touch /tmp/mark")

        def test_two(umtt_module_machine):
            assert umtt_module_machine.run("ls /tmp/mark").status == 0
    """)
    pytester.runpytest_subprocess(*kernel_args).assert_outcomes(passed=2)


# --- the older names ---------------------------------------------------------------------

OLD_FIXTURES = {
    "uml": "def test_{n}(uml):\n    assert uml.name == 'uml' and uml.run('true').ok\n",
    "uml_factory": "def test_{n}(uml_factory):\n    assert uml_factory('m').run('true').ok\n",
    "uml_module": "def test_{n}(uml_module):\n    assert uml_module.run('true').ok\n",
}
OLD_MARKERS = {
    "uml": ("uml(mem='200M', cmdline='a=1')", "(s.mem, s.cmdline) == ('200M', ('a=1',))"),
    "virtual_timeout": ("virtual_timeout(0.5)", "s.virtual_timeout == 0.5"),
    "wall_timeout": ("wall_timeout(7)", "s.wall_timeout == 7"),
}
NEW_NAMES = {"uml": "umtt_machine", "uml_factory": "umtt_machine_factory",
             "uml_module": "umtt_module_machine", "virtual_timeout": "umtt_virtual_timeout",
             "wall_timeout": "umtt_wall_timeout"}


@pytest.mark.parametrize("old", list(OLD_FIXTURES))
def test_an_old_fixture_name_works_and_warns_once(pytester: pytest.Pytester,
                                                 kernel_args: list[str], old: str) -> None:
    pytester.makepyfile("".join(OLD_FIXTURES[old].format(n=n) for n in (1, 2)))
    result = pytester.runpytest_subprocess(*kernel_args)
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines([f"*UmttDeprecationWarning: pytest-umtt's fixture {old!r} is "
                                 f"deprecated: use {NEW_NAMES[old]!r}*"])


@pytest.mark.parametrize("old", list(OLD_MARKERS))
def test_an_old_marker_name_works_and_warns_once(pytester: pytest.Pytester, old: str) -> None:
    marker, holds = OLD_MARKERS[old]
    pytester.makepyfile("import pytest\nfrom pytest_umtt.plugin import ITEM_SETTINGS\n" + "".join(
        f"@pytest.mark.{marker}\ndef test_{n}(request):\n"
        f"    s = request.node.stash[ITEM_SETTINGS]\n    assert {holds}\n" for n in (1, 2)))
    result = pytester.runpytest_subprocess("--strict-markers")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines([f"*UmttDeprecationWarning: pytest-umtt's marker {old!r} is "
                                 f"deprecated: use {NEW_NAMES[old]!r}*"])


def test_the_kernel_option_has_the_umtt_spelling_too(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("--umtt-kernel=/nonexistent/linux")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--uml-kernel: no kernel at '/nonexistent/linux'*"])


# --- hooks ---------------------------------------------------------------------------------

def test_hooks_add_cmdline_and_see_doorbells(pytester: pytest.Pytester,
                                             kernel_args: list[str]) -> None:
    pytester.makeconftest("""
        RUNG = []

        def pytest_umtt_kernel_cmdline(name):
            return [f"umtt_probe={name}"]

        def pytest_umtt_doorbell(machine, value):
            RUNG.append((machine.name, value))
    """)
    pytester.makepyfile("""
        from conftest import RUNG

        def test_x(umtt_machine):
            assert "umtt_probe=uml" in umtt_machine.run("cat /proc/cmdline").output
            umtt_machine.run("echo 12345 > /sys/kernel/um-ext-time/bc-message")
            assert ("uml", 12345) in RUNG
    """)
    pytester.runpytest_subprocess(*kernel_args).assert_outcomes(passed=1)


# --- reports --------------------------------------------------------------------------------

def test_failure_report_has_console_protocol_and_reproduce(pytester: pytest.Pytester,
                                                           kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        def test_fails(umtt_machine):
            umtt_machine.run("echo from-the-guest > /dev/kmsg")
            assert umtt_machine.run("printf 'one\\ntwo\\n'; echo oops >&2; false").ok
    """)
    artifacts = pytester.path / "artifacts"
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-seed=4",
                                           f"--umtt-artifacts={artifacts}",
                                           "--junitxml=report.xml", "-v")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*umtt console: uml (*console.log)*",
        "[[]*.* s[]] from-the-guest",
        "*umtt protocol (last events)*",
        "*umtt reproduce*",
        "*pytest test_failure_report_has_console_protocol_and_reproduce.py::test_fails"
        " --umtt-seed=4 --uml-kernel=*",
    ])
    saved = next(path for path in artifacts.iterdir() if path.name != "umtt-store")
    assert "from-the-guest" in (saved / "uml.console.log").read_text()
    events = [json.loads(line) for line in (saved / "trace.jsonl").read_text().splitlines()]
    assert {"RUN", "WAIT"} <= {event["op"] for event in events}
    assert any(event["kind"] == "device-kick" for event in events)  # the agent's channel
    assert 'name="umtt_virtual_seconds"' in (pytester.path / "report.xml").read_text()


def test_a_failed_assertion_shows_what_the_test_did_not_the_boot_log(
        pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        def test_fails(umtt_machine, umtt_sim):
            umtt_machine.run("echo from-the-guest > /dev/kmsg")
            umtt_sim.advance(2)
            assert umtt_machine.run("echo one; echo two; echo oops >&2; false").ok
    """)
    result = pytester.runpytest_subprocess(*kernel_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*- umtt what the test did -*",
        "[[]* s[]] uml booted (its boot log: *uml.console.log)",
        "[[]* s[]] uml $ echo from-the-guest > /dev/kmsg",
        "* exit 0 at * s (* s)",
        "[[]* s[]] uml console: from-the-guest",
        "[[]2.* s[]] uml $ echo one; echo two; echo oops >&2; false",
        "* exit 1 at 2.* s (* s)",
        "      stdout| one",
        "      stdout| two",
        "      stderr| oops",
        "[[]2.* s[]] now",
        "*- umtt reproduce -*",
    ])
    text = result.stdout.str()
    assert "umtt protocol" not in text and "umtt console: uml" not in text
    assert "Kernel command line" not in text  # no boot log
    lines = text[text.index("test session starts"):].count("\n")
    assert lines < 60, text  # the whole output, header and summary included


def test_a_crash_fails_the_test_with_its_cause(pytester: pytest.Pytester,
                                               kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        def test_crash(umtt_machine):
            umtt_machine.run("echo c > /proc/sysrq-trigger")
    """)
    result = pytester.runpytest_subprocess(*kernel_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*MachineCrashed: uml: kernel panic: *sysrq*",
                                 "*- umtt console: uml (*console.log) -*",  # the boot log too
                                 "*- umtt protocol (last events) -*",
                                 "*- umtt what the test did -*"])


# --- KUnit ----------------------------------------------------------------------------------

def test_kunit_cases_become_test_items(pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-kunit=list-kunit-test", "-v")
    result.stdout.fnmatch_lines(["*kunit::list-kunit-test.list_test_list_init PASSED*"])
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 30 and "failed" not in outcomes


def test_kunit_cases_run_when_selected_in_one_boot(pytester: pytest.Pytester,
                                                   kernel_args: list[str]) -> None:
    # Listing boots once while pytest collects (unless an earlier session's listing of
    # this kernel was kept); then one boot runs what -k kept.
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-kunit=*", "-v",
                                           "-k", "list_test_list_init or sysctl_test")
    result.stdout.fnmatch_lines_random([
        "*kunit::list-kunit-test.list_test_list_init PASSED*",
        "*kunit::sysctl_test.sysctl_test_api_dointvec_null_tbl_data PASSED*",
        "[12] simulations: *"])
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 5 and outcomes["deselected"] > 50 and "failed" not in outcomes


def test_kunit_cases_spread_over_xdist_workers(pytester: pytest.Pytester,
                                               kernel_args: list[str]) -> None:
    # The workers share one listing boot and one boot that runs the cases: the first to
    # ask boots, the other reads what it recorded. Two boots in all, as without xdist.
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-kunit=list-kunit-test",
                                           "-n", "2", "-v")
    outcomes = result.parseoutcomes()
    assert outcomes["passed"] > 30 and "failed" not in outcomes
    result.stdout.fnmatch_lines_random(["*gw0*PASSED*kunit::list-kunit-test.*",
                                        "*gw1*PASSED*kunit::list-kunit-test.*"])
    # The listing boot, unless an earlier session's listing of this kernel was kept.
    result.stdout.fnmatch_lines(["[12] simulations: *"])


def test_a_kernels_kunit_listing_is_kept_for_the_next_session(
        pytester: pytest.Pytester, kernel_args: list[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMTT_CACHE_DIR", str(tmp_path / "cache"))
    run = [*kernel_args, "--umtt-rootfs=host", "--umtt-kunit=list-kunit-test", "-q"]
    first = pytester.runpytest_subprocess(*run)
    first.stdout.fnmatch_lines(["2 simulations: *"])  # the listing, then the run
    [kept] = (tmp_path / "cache" / "kunit-lists").glob("*.json")
    again = pytester.runpytest_subprocess(*run)
    again.stdout.fnmatch_lines(["1 simulations: *"])  # the run only
    assert again.parseoutcomes()["passed"] == first.parseoutcomes()["passed"] > 30
    kept.write_text("{not json")  # a damaged record is listed again, and replaced
    third = pytester.runpytest_subprocess(*run)
    third.stdout.fnmatch_lines(["2 simulations: *"])
    assert third.parseoutcomes()["passed"] == first.parseoutcomes()["passed"]
    assert json.loads(kept.read_text())["error"] is None
    other = pytester.runpytest_subprocess(*run, "--umtt-cmdline=loglevel=7")
    other.stdout.fnmatch_lines(["2 simulations: *"])  # another command line, another listing


def test_kunit_glob_that_matches_nothing_fails_clearly(pytester: pytest.Pytester,
                                                       kernel_args: list[str]) -> None:
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-kunit=no-such-suite")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no KUnit test case matched 'no-such-suite'*"])


# --- xdist ----------------------------------------------------------------------------------

def test_xdist_workers_have_their_own_simulations(pytester: pytest.Pytester,
                                                  kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        import os
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_machine(umtt_machine, umtt_sim, n):
            print("SIM", os.environ["PYTEST_XDIST_WORKER"], umtt_sim.directory)
            assert umtt_machine.run(f"sleep {n + 1}").duration == pytest.approx(n + 1, abs=1e-3)
    """)
    result = pytester.runpytest_subprocess(*kernel_args, "-n", "2", "-s")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*4 simulations: * s of virtual time in * s wall*"])


def test_the_listing_gives_cases_and_each_empty_suite() -> None:
    # lib/kunit/executor.c prints each suite's name, then its cases; a suite with none
    # (kunit_fault where the architecture cannot fault on purpose) is one skipped test
    # for the kernel and kunit.py alike, so it is an item too.
    console = ("Linux version 6.12\nKTAP version 1\nexample\nexample.example_simple_test\n"
               "kunit_fault\nlist-kunit-test\nlist-kunit-test.list_test_list_init\n"
               "random: crng init done\nmctp\nRun /bin/bash as init process\nstray\n")
    assert listed_cases(console) == ["example.example_simple_test", "kunit_fault",
                                     "list-kunit-test.list_test_list_init", "mctp"]
    assert listed_cases("no listing here\n") == []


def test_a_crashed_kunit_case_shows_the_crash_and_its_times(tmp_path: Path) -> None:
    logs = sorted(cache_root().glob("src/*/tools/testing/kunit/test_data"))
    if not logs:
        pytest.skip(f"no kernel tree under {cache_root() / 'src'} (umtt-kernel build makes one)")
    console = Console(tmp_path / "console.log")
    console.feed((logs[0] / "test_kernel_panic_interrupt.log").read_bytes(), 1_500_000)
    crashed = [case for case in parse_ktap(console.text) if case.crashed]
    assert crashed
    boot = KunitBoot(console, "", None)
    shown = crash_console(boot, crashed[0])
    assert "Kernel panic - not syncing" in shown
    assert "[0.001500000 s]" in shown
    # Another xdist worker reads the same from what this boot recorded.
    recorded = KunitBoot.from_record(json.loads(json.dumps(boot.record())))
    assert recorded.console is None and crash_console(recorded, crashed[0]) == shown
    console.close()
