"""Kernel selftests in virtual time.

Two ways: run a whole installed tree, each test and KTAP subtest a pytest item::

    pytest --umtt-kselftest="$(umtt-kselftest build --targets timers)"

or run one kselftest from a test of your own, as below, and assert on its result.
"""

import shutil
from pathlib import Path

import pytest

from pytest_umtt import Machine
from pytest_umtt.kselftest import KselftestTest, Outcome, build_kselftests, run_kselftest


@pytest.fixture(scope="session")
def timers_tree() -> Path:
    """The timers kselftests, built once from the kernel's source and cached."""
    missing = [tool for tool in ("make", "gcc", "rsync") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building kselftests needs {', '.join(missing)}")
    return build_kselftests(["timers"])


def test_nanosleep_selftest_passes(umtt_machine: Machine, timers_tree: Path) -> None:
    tree = umtt_machine.push(timers_tree, "kselftest")  # the guest sees it at /mnt/kselftest
    result = run_kselftest(umtt_machine, KselftestTest("timers", "nanosleep"), tree=tree,
                           timeout=45, wall_timeout=30)
    assert result.outcome is Outcome.PASS, f"{result.detail}\n{result.output}"
    assert all(case.ok for case in result.cases)
    # Every clock's sleeps, natively about 12 s, take about a second of wall time here.
    assert result.virtual == pytest.approx(12.1, abs=0.5)
