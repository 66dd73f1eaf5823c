"""The kernel's driver selftests (rtc, watchdog, gpio, drivers/net/netdevsim,
drivers/net/bonding, firmware) in pytest-umtt: the kernel config they ask for, the files
and tools they need, what is known of them beforehand, and how they end on real kernels."""

from __future__ import annotations

import shutil
from pathlib import Path
from xml.etree import ElementTree

import pytest

from pytest_umtt import KernelConfig
from pytest_umtt.cache import cache_root
from pytest_umtt.errors import KselftestError
from pytest_umtt.kernel import build_kernel, debian_source
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


# --- on the variant their config files ask for --------------------------------------------

DRIVER_TARGETS = ("gpio", "drivers/net/netdevsim", "drivers/net/bonding", *RTC_AND_WATCHDOG,
                  "firmware")
DRIVERS = KernelConfig(kselftest_targets=DRIVER_TARGETS)
"""The README's driver selftests: one tree, one variant (rtc and watchdog add nothing)."""


@pytest.fixture(scope="module")
def drivers_kernel(uml_kernel: Path) -> Path:
    """The variant of the driver targets' configs (with pytest-umtt's additions for UML),
    built (incrementally) once and cached."""
    return build_kernel(debian_source(cache_root(), print), config=DRIVERS)


@pytest.mark.kernel
def test_netdevsim_and_bonding_selftests_on_their_variant(
        pytester: pytest.Pytester, drivers_kernel: Path, real_cache: Path,
        builds_kselftests: None) -> None:
    tree = build_kselftests(list(DRIVER_TARGETS))
    result = pytester.runpytest_subprocess(
        f"--umtt-kselftest={tree}", f"--umtt-kconfig={DRIVERS.to_spec()}", "-v", "-rsx",
        "-p", "no:cacheprovider", "--junitxml=out.xml", "-k",
        "devlink.sh or ethtool-pause or mode-1-recovery-updelay or tc-mq-visibility or fib.sh")
    result.stdout.fnmatch_lines_random([
        "*kselftest::drivers/net/netdevsim:devlink.sh PASSED*",
        "*kselftest::drivers/net/netdevsim:ethtool-pause.sh PASSED*",
        "*kselftest::drivers/net/bonding:mode-1-recovery-updelay.sh PASSED*",
        "XFAIL *tc-mq-visibility.sh - its \"Graft some\" step moves qdisc 204:*",
        "SKIPPED * not under UML: its first check waits in net/lib.sh's busywait*"])
    result.assert_outcomes(passed=3, xfailed=1, skipped=1)
    # The updelay test waits for bonding's timers: more virtual time than its wall time.
    updelay = "drivers/net/bonding:mode-1-recovery-updelay.sh"
    assert virtual_seconds(pytester.path / "out.xml", updelay) > 10
