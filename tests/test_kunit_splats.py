"""KUnit cases are checked for splats: each report in a KUnit boot's console fails the
case during which it appeared (its KTAP result's lines), not the whole run.

The console is a real KUnit boot's output (tests/data/kunit-6.12-boot.txt) with a real
WARNING report (from tests/data/splats-lkdtm-6.12.log) spliced into one case, fed through
the machine's own Console and splat scanner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_umtt.ktap import parse_ktap
from pytest_umtt.plugin.suites import KunitBoot, KunitResults, positioned_splats, splats_by_case
from pytest_umtt.uml.console import Console

DATA = Path(__file__).parent / "data"
BOOT = (DATA / "kunit-6.12-boot.txt").read_text().splitlines()
LKDTM = (DATA / "splats-lkdtm-6.12.log").read_text().splitlines()
WARNING = LKDTM[LKDTM.index("------------[ cut here ]------------"):][:40]
"""LKDTM's WARNING report, from ``cut here`` to ``end trace``."""


def console_of(lines: list[str], tmp_path: Path) -> Console:
    console = Console(tmp_path / "kunit.console.log", "kunit")
    console.feed(("\n".join(lines) + "\n").encode(), 1_000)
    console.close()
    return console


def spliced(before: str, *reports: list[str]) -> list[str]:
    """The boot's console with ``reports`` printed just before the line ``before``."""
    at = BOOT.index(before)
    return BOOT[:at] + [line for report in reports for line in report] + BOOT[at:]


def test_a_splat_goes_to_the_case_it_was_printed_in(tmp_path: Path) -> None:
    assert WARNING[-1].startswith("---[ end trace")
    console = console_of(spliced("    ok 3 sysctl_test_api_dointvec_table_len_is_zero",
                                 WARNING), tmp_path)
    cases = parse_ktap(console.text)
    assert len(cases) == 77  # the report does not disturb the KTAP
    found = splats_by_case(positioned_splats(console), cases)
    assert list(found) == ["sysctl_test.sysctl_test_api_dointvec_table_len_is_zero"]
    [splat] = found["sysctl_test.sysctl_test_api_dointvec_table_len_is_zero"]
    assert splat.kind == "WARNING" and splat.complete
    assert splat.signature.startswith("WARNING: lkdtm_WARNING:")


def test_splats_between_suites_and_before_any_case_have_a_case_too(tmp_path: Path) -> None:
    console = console_of(["booting", *WARNING, *spliced("ok 2 sysctl_test", WARNING)],
                         tmp_path)
    cases = parse_ktap(console.text)
    found = splats_by_case(positioned_splats(console), cases)
    # Before the first result: the first case. After a suite's last case: that case.
    assert {name: len(splats) for name, splats in found.items()} == {
        "time_test_cases.time64_to_tm_test_date_range": 1,
        "sysctl_test.sysctl_test_register_sysctl_sz_invalid_extra_value": 1}


def test_lines_the_kernel_breaks_oddly_do_not_shift_the_cases(tmp_path: Path) -> None:
    # A form feed ends no console line but does end one for str.splitlines(), which
    # KTAP's line numbers count in: counted as one, these would move the report's header
    # three lines back, into the case before.
    console = console_of(["form\x0cfeeds\x0cin\x0cone line",
                          *spliced("    ok 2 list_test_list_add", WARNING)], tmp_path)
    found = splats_by_case(positioned_splats(console), parse_ktap(console.text))
    assert list(found) == ["list-kunit-test.list_test_list_add"]


PROVOKE_AT_BOOT = "lkdtm.cpoint_name=DIRECT lkdtm.cpoint_type=WARNING"
"""LKDTM's DIRECT crash point acts when LKDTM starts (drivers/misc/lkdtm/core.c
lkdtm_register_cpoint), before the KUnit suites run: its WARNING goes to the first case."""


@pytest.mark.kernel
def test_a_kunit_case_fails_for_a_splat_unless_allowed(pytester: pytest.Pytester,
                                                      kernel_args: list[str]) -> None:
    run = ["--umtt-kunit=time_test_cases", f"--umtt-cmdline={PROVOKE_AT_BOOT}", "-v"]
    result = pytester.runpytest_subprocess(*kernel_args, *run)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*kunit::time_test_cases.time64_to_tm_test_date_range FAILED*",
        "a kernel splat on kunit: WARNING: lkdtm_WARNING:* (the test itself passed)",
    ])
    allowed = pytester.runpytest_subprocess(*kernel_args, *run,
                                            "--umtt-allow-splat=lkdtm_WARNING")
    allowed.assert_outcomes(passed=1)
    allowed.stdout.fnmatch_lines(["kernel splats: 1 allowed"])


def test_a_quiet_boot_gives_no_splats(tmp_path: Path) -> None:
    console = console_of(BOOT, tmp_path)
    assert splats_by_case(positioned_splats(console), parse_ktap(console.text)) == {}
    assert splats_by_case((), []) == {}


def test_a_boot_another_worker_recorded_keeps_its_splats(tmp_path: Path) -> None:
    # Under xdist one worker boots and records; the others judge from the record.
    console = console_of(spliced("    ok 2 list_test_list_add", WARNING), tmp_path)
    booted = KunitBoot(console, "", None, splats=positioned_splats(console))
    read = KunitBoot.from_record(json.loads(json.dumps(booted.record())))
    here, there = (KunitResults.from_boot("*", boot) for boot in (booted, read))
    assert list(there.splats) == list(here.splats) == ["list-kunit-test.list_test_list_add"]
    [mine], [theirs] = (r.splats_of("list-kunit-test.list_test_list_add") for r in (here, there))
    assert (theirs.signature, theirs.time_ns, len(theirs.lines), theirs.complete) == (
        mine.signature, mine.time_ns, len(mine.lines), mine.complete)
    assert here.splats_of("list-kunit-test.list_test_list_init") == []
