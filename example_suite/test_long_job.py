"""Hours of virtual time in seconds of wall time."""

import pytest

from pytest_umtt import Machine, Simulation


@pytest.mark.umtt_virtual_timeout(25 * 3600)
def test_a_day_of_hourly_work(umtt_machine: Machine, umtt_sim: Simulation) -> None:
    with umtt_sim.elapsed(at_least=24 * 3600, at_most=24 * 3600 + 1):
        result = umtt_machine.run("for h in $(seq 24); do sleep 3600; "
                                  "date -u +%H:%M >> /tmp/log; done; cat /tmp/log")
    hours = result.output.split()
    assert len(hours) == 24
    assert hours[0] != hours[1]  # the guest's clock moved an hour each time
