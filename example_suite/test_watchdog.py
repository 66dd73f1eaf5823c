"""The softdog watchdog fires after its margin, to the millisecond, in virtual time."""

import pytest

from pytest_umtt import Machine, MachineFactory, Simulation


@pytest.fixture
def guarded(umtt_machine_factory: MachineFactory) -> Machine:
    return umtt_machine_factory("guarded",
                                cmdline=["softdog.soft_margin=5", "softdog.soft_noboot=1"])


def test_softdog_fires_after_its_margin(guarded: Machine, umtt_sim: Simulation) -> None:
    opened = guarded.start("exec 3>/dev/watchdog; echo ping >&3; sleep 60").started
    fired = guarded.expect(r"softdog: Triggered - Reboot ignored", timeout=10)
    assert fired.time - opened == pytest.approx(5.0, abs=0.01)


def test_softdog_stays_quiet_while_fed(guarded: Machine) -> None:
    guarded.start("exec 3>/dev/watchdog; for i in $(seq 10); do echo ping >&3; sleep 2; done")
    with pytest.raises(Exception, match="did not appear"):
        guarded.expect("softdog: Triggered", timeout=15)
