"""KTAP parsing: KUnit's console output into named test cases."""

from __future__ import annotations

from pathlib import Path

from pytest_umtt.ktap import parse_ktap

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


def test_cases_are_named_like_kunit_py_and_keep_diagnostics() -> None:
    cases = {case.name: case for case in parse_ktap(CRAFTED)}
    assert list(cases) == ["example.example_simple", "example.example_fails",
                           "example.example_params.param-one",
                           "example.example_params.param-two", "other.other_case"]
    assert cases["example.example_simple"].ok
    failed = cases["example.example_fails"]
    assert not failed.ok
    assert failed.diagnostics == ("# example_fails: EXPECTATION FAILED at lib/example.c:42",
                                  "Expected 1 == 2, but", "1 == 1 (0x1)")
    assert not cases["example.example_params.param-two"].ok
    skipped = cases["other.other_case"]
    assert skipped.ok and skipped.skipped and skipped.reason == "not on this arch"


def test_real_kunit_boot_output() -> None:
    text = (Path(__file__).parent / "data" / "kunit-6.12-boot.txt").read_text()
    cases = parse_ktap(text)
    assert len(cases) == 77 and all(case.ok for case in cases)
    assert "list-kunit-test.list_test_list_init" in {case.name for case in cases}


def test_no_ktap_no_cases() -> None:
    assert parse_ktap("Linux version 6.12\nRun /bin/bash as init process\n") == []
