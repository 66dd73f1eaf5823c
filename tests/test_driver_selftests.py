"""The kernel's driver selftests (rtc, watchdog, gpio, drivers/net/netdevsim,
drivers/net/bonding, firmware) in pytest-umtt: the kernel config they ask for, the files
and tools they need, what is known of them beforehand, and how they end on real kernels."""

from __future__ import annotations

import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_umtt.errors import KselftestError
from pytest_umtt.kselftest import build_kselftests, known_outcomes, missing_includes, read_tests

RTC_AND_WATCHDOG = ("rtc", "watchdog")


@pytest.fixture(scope="module")
def builds_kselftests() -> None:
    missing = [tool for tool in ("make", "gcc", "rsync") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building kselftests needs {', '.join(missing)}")


# --- without a kernel -------------------------------------------------------------------

def test_known_outcomes_name_the_test_the_kind_and_the_reason() -> None:
    known = known_outcomes("# comment\n\nrtc:rtctest skip no clock here\n"
                           "watchdog:watchdog-test xfail never ends by itself\n")
    assert {test: (k.kind, k.reason) for test, k in known.items()} == {
        "rtc:rtctest": ("skip", "no clock here"),
        "watchdog:watchdog-test": ("xfail", "never ends by itself")}


@pytest.mark.parametrize("line", ["rtc:rtctest", "rtc:rtctest skip", "rtctest skip why",
                                  "rtc:rtctest maybe why"])
def test_a_bad_known_outcome_line_is_named(line: str) -> None:
    with pytest.raises(KselftestError, match=r"known\.txt:1: expected 'collection:test "
                                             r"skip\|xfail reason'"):
        known_outcomes(f"{line}\n")


def test_the_shipped_known_outcomes_name_tests_of_the_driver_targets(
        builds_kselftests: None) -> None:
    tree = build_kselftests(["drivers/net/netdevsim", "drivers/net/bonding", *RTC_AND_WATCHDOG,
                             "firmware"])
    listed = {test.id for test in read_tests(tree)}
    assert set(known_outcomes()) <= listed


def test_netdevsims_scripts_find_what_they_source(builds_kselftests: None) -> None:
    # Its 6.12 Makefile installs none of net/forwarding's libraries its scripts source.
    assert "net/forwarding/devlink_lib.sh" in missing_includes("drivers/net/netdevsim")
    tree = build_kselftests(["drivers/net/netdevsim"])
    for relative in missing_includes("drivers/net/netdevsim"):
        assert (tree / relative).is_file(), relative


# --- on the default kernel (rtc and watchdog need no config of their own) ----------------

@pytest.mark.kernel
def test_rtc_alarms_pass_in_virtual_time_and_watchdog_test_is_known(
        pytester: pytest.Pytester, kernel_args: list[str], builds_kselftests: None) -> None:
    tree = build_kselftests(list(RTC_AND_WATCHDOG))
    result = pytester.runpytest_subprocess(*kernel_args, f"--umtt-kselftest={tree}", "-v",
                                           "-rx", "--junitxml=out.xml")
    result.stdout.fnmatch_lines_random([
        "*kselftest::rtc:rtctest PASSED*",
        "*kselftest::rtc:rtctest SUBPASSED[[]rtc.alarm_alm_set_minute[]]*",
        "XFAIL *kselftest::watchdog:watchdog-test - pings the watchdog in an endless loop*"])
    result.assert_outcomes(passed=1, xfailed=1)
    result.stdout.fnmatch_lines(["* 8 subtests passed in *"])
    # rtctest waits for alarms at minute boundaries: minutes of virtual time.
    assert virtual_seconds(pytester.path / "out.xml", "rtc:rtctest") > 60


def virtual_seconds(junit: Path, name: str) -> float:
    """The virtual seconds a kselftest item took, from its JUnit properties."""
    case = ElementTree.parse(junit).find(f".//testcase[@name='{name}']/properties")
    assert case is not None
    (value,) = (p.get("value") for p in case if p.get("name") == "umtt_virtual_seconds")
    return float(value or "nan")
