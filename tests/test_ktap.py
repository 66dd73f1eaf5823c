"""KTAP parsing: KUnit's console output into named test cases."""

from __future__ import annotations

import importlib
import io
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from pytest_umtt.cache import cache_root
from pytest_umtt.ktap import KtapCase, KtapStatus, parse_ktap
from pytest_umtt.plugin.suites import KunitResults

CRAFTED = """\
random console noise
KTAP version 1
1..2
    KTAP version 1
    # Subtest: example
    # module: example_test
    1..3
    ok 1 example_simple
    # example_fails: EXPECTATION FAILED at lib/example.c:42
    Expected 1 == 2, but
        1 == 1 (0x1)
    not ok 2 example_fails
        KTAP version 1
        # Subtest: example_params
        ok 1 param-one
        not ok 2 param-two
    # example_params: pass:1 fail:1 skip:0 total:2
    not ok 3 example_params
# example: pass:1 fail:2 skip:0 total:3
not ok 1 example
    KTAP version 1
    # Subtest: other
    1..1
    ok 1 other_case # SKIP not on this arch
ok 2 other
"""


def by_name(text: str) -> dict[str, KtapCase]:
    return {case.name: case for case in parse_ktap(text)}


def test_cases_are_named_like_kunit_py_and_keep_diagnostics() -> None:
    cases = by_name(CRAFTED)
    assert list(cases) == ["example.example_simple", "example.example_fails",
                           "example.example_params.param-one",
                           "example.example_params.param-two", "other.other_case"]
    assert cases["example.example_simple"].status is KtapStatus.PASSED
    failed = cases["example.example_fails"]
    assert not failed.ok and failed.status is KtapStatus.FAILED
    # The common indentation goes, the message's own stays.
    assert failed.diagnostics == ("# example_fails: EXPECTATION FAILED at lib/example.c:42",
                                  "Expected 1 == 2, but", "    1 == 1 (0x1)")
    assert not cases["example.example_params.param-two"].ok
    skipped = cases["other.other_case"]
    assert skipped.ok and skipped.skipped and skipped.reason == "not on this arch"


def test_a_case_covers_its_diagnostics_and_result_line() -> None:
    lines = CRAFTED.splitlines()
    failed = by_name(CRAFTED)["example.example_fails"]
    assert lines[failed.lines.start].endswith("EXPECTATION FAILED at lib/example.c:42")
    assert lines[failed.lines.stop - 1] == "    not ok 2 example_fails"


PREFIXED = """\
[    0.000000][    T0] Linux version 6.12.0
[    0.412345][    T1] KTAP version 1
[    0.412346][    T1] 1..1
[    0.412347][    T1]     KTAP version 1
[    0.412348][    T1]     # Subtest: list-kunit-test
[    0.412349][    T1]     1..2
[    0.412350][    T1]     ok 1 list_test_list_init
[    0.412351][    T1]     # list_test_list_add: something to say
[    0.412352][    T1]     ok 2 list_test_list_add
[    0.412353][    T1] ok 1 list-kunit-test
"""


def test_a_printk_prefix_is_cut_off_every_line() -> None:
    cases = by_name(PREFIXED)
    assert list(cases) == ["list-kunit-test.list_test_list_init",
                           "list-kunit-test.list_test_list_add"]
    assert all(case.status is KtapStatus.PASSED for case in cases.values())
    assert cases["list-kunit-test.list_test_list_add"].diagnostics == (
        "# list_test_list_add: something to say",)


CRASH = """\
KTAP version 1
1..2
    KTAP version 1
    # Subtest: stream
    1..3
    ok 1 stream_empty
BUG: kernel NULL pointer dereference, address: 0000000000000000
Oops: 0000 [#1] PREEMPT
Kernel panic - not syncing: Fatal exception
"""


def test_a_crash_mid_suite_keeps_the_missing_cases_as_crashed() -> None:
    cases = by_name(CRASH)
    assert {name: case.status for name, case in cases.items()} == {
        "stream.stream_empty": KtapStatus.PASSED,
        "stream.case-2": KtapStatus.CRASHED,
        "stream.case-3": KtapStatus.CRASHED,
        "case-2": KtapStatus.CRASHED,  # the second suite the top-level plan announced
    }
    crashed = cases["stream.case-2"]
    assert crashed.crashed and not crashed.ok and not crashed.skipped
    assert crashed.diagnostics[0].startswith("BUG: kernel NULL pointer dereference")
    assert CRASH.splitlines()[crashed.lines.start:crashed.lines.stop] == list(crashed.diagnostics)
    # The output went to the first case that did not report, not to those after it.
    assert cases["stream.case-3"].diagnostics == ()


def test_a_plan_that_is_met_ends_the_suite_and_the_document() -> None:
    text = CRAFTED.replace("1..2\n", "1..1\n", 1)
    assert "other.other_case" not in by_name(text)


def test_the_end_of_the_boot_ends_the_document() -> None:
    text = "KTAP version 1\nok 1 first\nreboot: System halted\nok 2 late\n"
    assert list(by_name(text)) == ["first"]


@pytest.mark.parametrize("unit", ["  ", "    ", "\t"], ids=["2-space", "4-space", "tab"])
def test_indentation_does_not_matter(unit: str) -> None:
    text = (
        "KTAP version 1\n1..1\n"
        "{a}KTAP version 1\n{a}# Subtest: suite\n{a}1..2\n{a}ok 1 test_1\n"
        "{b}KTAP version 1\n{b}# Subtest: test_2\n{b}ok 1 param-a\n{b}not ok 2 param-b\n"
        "{a}not ok 2 test_2\n"
        "not ok 1 suite\n"
    ).format(a=unit, b=unit * 2)
    assert {name: case.status for name, case in by_name(text).items()} == {
        "suite.test_1": KtapStatus.PASSED,
        "suite.test_2.param-a": KtapStatus.PASSED,
        "suite.test_2.param-b": KtapStatus.FAILED,
    }


def test_a_suite_named_only_on_its_result_line_prefixes_its_cases() -> None:
    text = "KTAP version 1\n1..1\n  KTAP version 1\n  1..2\n  ok 1 a\n  ok 2 b\nok 1 suite\n"
    assert list(by_name(text)) == ["suite.a", "suite.b"]


def test_an_empty_subtest_ran_nothing_rather_than_passed() -> None:
    text = ("TAP version 14\n1..1\n  # Subtest: suite\n  1..1\n    # Subtest: case\n"
            "  ok 1 - case\nok 1 - suite\n")
    (case,) = parse_ktap(text)
    assert case.name == "suite.case" and case.status is KtapStatus.NO_TESTS
    assert case.skipped and case.reason == "no tests run"


def test_an_empty_subtest_that_failed_stays_failed() -> None:
    text = "KTAP version 1\n1..1\n  # Subtest: suite\n  1..0\nnot ok 1 suite\n"
    (case,) = parse_ktap(text)
    assert case.name == "suite" and case.status is KtapStatus.FAILED


@pytest.mark.parametrize(("line", "status"), [
    ("ok 1 - x", KtapStatus.PASSED),
    ("not ok 1 x", KtapStatus.FAILED),
    ("not ok 1 x # SKIP no device", KtapStatus.SKIPPED),
    ("not ok 1 x # TODO later", KtapStatus.FAILED),  # kunit.py knows SKIP only
])
def test_result_lines(line: str, status: KtapStatus) -> None:
    (case,) = parse_ktap(f"KTAP version 1\n1..1\n{line}\n")
    assert case.name == "x" and case.status is status


def test_a_skip_after_another_directive_names_the_case_as_kunit_py_does() -> None:
    (case,) = parse_ktap("KTAP version 1\n1..1\nok 1 x # TODO # SKIP why\n")
    assert (case.name, case.status, case.reason) == ("x # TODO", KtapStatus.SKIPPED, "why")


def test_a_plan_line_where_a_test_should_start_is_read_past() -> None:
    # kunit.py neither takes nor skips such a line, and without a plan never ends.
    text = "KTAP version 1\nok 1 a\n1..2\nok 2 b\n"
    assert list(by_name(text)) == ["a", "b"]


def test_real_kunit_boot_output() -> None:
    text = (Path(__file__).parent / "data" / "kunit-6.12-boot.txt").read_text()
    cases = parse_ktap(text)
    assert len(cases) == 77 and all(case.status is KtapStatus.PASSED for case in cases)
    assert "list-kunit-test.list_test_list_init" in {case.name for case in cases}


def test_no_ktap_no_cases() -> None:
    assert parse_ktap("Linux version 6.12\nRun /bin/bash as init process\n") == []


# --- Parity with the kernel's own parser -------------------------------------------

def _kunit_tool_dir() -> Path | None:
    found = sorted((cache_root() / "src").glob("*/tools/testing/kunit/kunit_parser.py"))
    return found[-1].parent if found else None


KUNIT_TOOL = _kunit_tool_dir()
KUNIT_LOGS = sorted((KUNIT_TOOL / "test_data").glob("*.log")) if KUNIT_TOOL else []
KUNIT_STATUS = {"SUCCESS": KtapStatus.PASSED, "FAILURE": KtapStatus.FAILED,
                "SKIPPED": KtapStatus.SKIPPED, "TEST_CRASHED": KtapStatus.CRASHED,
                "NO_TESTS": KtapStatus.NO_TESTS}


@pytest.fixture(scope="module")
def kunit_parser() -> Iterator[ModuleType]:
    """The kernel tree's kunit_parser, importable for this module's tests only."""
    if KUNIT_TOOL is None:
        pytest.skip(f"no kernel source tree with tools/testing/kunit under {cache_root() / 'src'}")
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(KUNIT_TOOL))
        try:
            parser = importlib.import_module("kunit_parser")
            # It prints a summary as it parses; keep that out of the test's output.
            printer = importlib.import_module("kunit_printer")
            patch.setattr(parser, "stdout", printer.Printer(io.StringIO()))
            yield parser
        finally:
            for name in ("kunit_parser", "kunit_printer"):
                sys.modules.pop(name, None)


def kunit_leaves(test: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, KtapStatus]]:
    """kunit.py's leaf tests, full names joined with dots as ours are.

    kunit.py leaves a case it never saw unnamed; ours calls it by its number.
    """
    for number, sub in enumerate(test.subtests, 1):
        if sub.subtests:
            yield from kunit_leaves(sub, (*path, sub.name) if sub.name else path)
        else:
            name = ".".join((*path, sub.name or f"case-{number}"))
            yield name, KUNIT_STATUS[sub.status.name]


@pytest.mark.parametrize("log", KUNIT_LOGS or [None],
                         ids=lambda log: log.name if log else "no-kernel-tree")
def test_same_cases_as_kunit_py(kunit_parser: ModuleType, log: Path) -> None:
    text = log.read_text(errors="replace")
    expected = list(kunit_leaves(kunit_parser.parse_run_tests(text.splitlines())))
    assert [(case.name, case.status) for case in parse_ktap(text)] == expected


def test_results_without_a_name_as_kselftest_prints_skips() -> None:
    cases = parse_ktap("TAP version 13\n1..3\nok 1 CLOCK_REALTIME\n"
                       "ok 2 # SKIP CLOCK_PROCESS_CPUTIME_ID\nok 3\n"
                       "# Totals: pass:2 fail:0 xfail:0 xpass:0 skip:1 error:0\n")
    assert [(c.name, c.status, c.reason) for c in cases] == [
        ("CLOCK_REALTIME", KtapStatus.PASSED, ""),
        ("case-2", KtapStatus.SKIPPED, "CLOCK_PROCESS_CPUTIME_ID"),
        ("case-3", KtapStatus.PASSED, "")]


def kunit_items(test: Any) -> list[str]:
    """The items a listing boot gives for the cases in kunit.py's tree: ``suite.case``
    for each case of each top-level suite (lib/kunit/executor.c's list action)."""
    return [f"{suite.name}.{case.name}" for suite in test.subtests if suite.subtests
            for case in suite.subtests if case.name]


@pytest.mark.parametrize("log", KUNIT_LOGS or [None],
                         ids=lambda log: log.name if log else "no-kernel-tree")
def test_each_kunit_py_result_is_one_item_or_one_parameter_report(
        kunit_parser: ModuleType, log: Path) -> None:
    # The items and the subtest reports they make, in order, are kunit.py's leaf tests
    # with their statuses: a case with parameters reports each as a subtest. A case the
    # kernel died before naming is an item by its listed name, failing as not reported.
    text = log.read_text(errors="replace")
    tree = kunit_parser.parse_run_tests(text.splitlines())
    results = KunitResults.from_text("*", text)
    reported = [(name, case.status) for item in kunit_items(tree)
                for name, case in results.reported(item)]
    expected = [(name, status) for name, status in kunit_leaves(tree)
                if name.count(".") >= 1 and not re.search(r"\.case-\d+$", name)]
    assert reported == expected


def test_a_parameterised_case_is_one_item_with_its_parameters_reported() -> None:
    text = ("KTAP version 1\n1..1\n    KTAP version 1\n    # Subtest: suite\n    1..2\n"
            "        KTAP version 1\n        # Subtest: by_param\n"
            "        ok 1 zero\n        not ok 2 one\n        ok 3 two # SKIP no two\n"
            "    not ok 1 by_param\n    ok 2 plain\nnot ok 1 suite\n")
    results = KunitResults.from_text("suite", text)
    assert results.cases["suite.by_param"].status is KtapStatus.FAILED
    assert [(name, case.status, case.reason) for name, case in
            results.reported("suite.by_param")] == [
        ("suite.by_param.zero", KtapStatus.PASSED, ""),
        ("suite.by_param.one", KtapStatus.FAILED, ""),
        ("suite.by_param.two", KtapStatus.SKIPPED, "no two")]
    assert [name for name, _ in results.reported("suite.plain")] == ["suite.plain"]
    assert results.reported("suite.missing") == []
