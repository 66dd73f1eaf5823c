"""One unit rule at the user API: float seconds under the bare name, exact integer
nanoseconds beside it under ``_ns``; both at once, or a value out of range, is an error
naming the argument; names whose meaning changed from nanoseconds to seconds warn."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest

from pytest_umtt import units
from pytest_umtt.devices import Network, VirtioRng
from pytest_umtt.units import (
    MAX_NS,
    MAX_SECONDS,
    UnitChangedWarning,
    either,
    ns_to_seconds,
    seconds_to_ns,
)
from tests.test_gpio_model import Bench


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sees the once-per-process warnings afresh."""
    monkeypatch.setattr(units, "_warned", set())


def test_seconds_become_exact_nanoseconds_rounded_to_the_nearest() -> None:
    assert seconds_to_ns(0.001) == 1_000_000
    assert seconds_to_ns(1.5) == 1_500_000_000
    assert seconds_to_ns(0.1 + 0.2) == 300_000_000  # 0.30000000000000004 s
    assert seconds_to_ns(7) == 7_000_000_000
    assert ns_to_seconds(2_500_000_000) == 2.5
    assert seconds_to_ns(MAX_SECONDS) == MAX_NS


@pytest.mark.parametrize("bad", [-1e-9, -1, math.nan, math.inf, -math.inf, 1e300,
                                 MAX_SECONDS * 1.001])
def test_a_negative_non_finite_or_huge_value_names_its_argument(bad: float) -> None:
    with pytest.raises(ValueError, match=r"^at= must be a number of virtual seconds from 0 "
                                         r"to 1e\+09, got"):
        either("at", bad, None)


def test_a_wrong_type_or_a_bad_exact_value_names_its_argument() -> None:
    with pytest.raises(TypeError, match="latency= must be a number of seconds, got '1'"):
        either("latency", "1", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="at_ns= must be an integer number of nanoseconds"):
        either("at", None, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at_ns= must be from 0 to"):
        either("at", None, -1)
    with pytest.raises(ValueError, match="at_ns= must be from 0 to"):
        either("at", None, MAX_NS + 1)


def test_both_forms_at_once_is_an_error_naming_both() -> None:
    with pytest.raises(TypeError, match=r"give at= \(seconds\) or at_ns= \(nanoseconds\), "
                                        r"not both"):
        either("at", 1.0, 1_000_000_000)
    assert either("at", None, None) is None
    assert either("at", 2.0, None) == either("at", None, 2_000_000_000) == 2_000_000_000


def test_device_times_take_either_form() -> None:
    assert VirtioRng(latency=0.25).latency_ns == VirtioRng(latency_ns=250_000_000).latency_ns
    assert VirtioRng().latency_ns == 1_000_000
    with pytest.raises(TypeError, match="not both"):
        VirtioRng(latency=0.1, latency_ns=100_000_000)
    with pytest.raises(ValueError, match="latency="):
        VirtioRng(latency=-0.1)
    net = Network(latency=0.002)
    assert net.default.latency_ns == 2_000_000
    link = net.link("a", "b", latency=0.005, reorder=0.5, reorder_delay=0.003)
    assert (link.latency_ns, link.reorder_delay_ns, link.latency) == (5_000_000, 3_000_000,
                                                                      0.005)
    old = net.link("a", "c", latency_ns=7, reorder_ns=9)  # the older spelling still works
    assert (old.latency_ns, old.reorder_delay_ns, old.reorder_ns) == (7, 9, 9)
    with pytest.raises(TypeError, match="not both"):
        net.link("a", "b", latency=0.001, latency_ns=1_000_000)
    with pytest.raises(ValueError, match="reorder_delay="):
        net.link("a", "b", reorder_delay=math.nan)
    with pytest.raises(TypeError, match="a link has no 'delay'"):
        net.link("a", "b", delay=1)


def test_gpio_instants_in_seconds_land_on_their_exact_nanosecond(tmp_path: Path) -> None:
    bench = Bench(tmp_path / "gpio.sock")
    try:
        bench.chip.drive("button", 1, at=0.000001)  # 1000 ns
        bench.chip.drive("button", 0, at_ns=2000)
        fault = bench.chip.fail("led", at=0.000003, until=0.000004)
        with pytest.raises(TypeError, match="not both"):
            bench.chip.drive("button", 1, at=1.0, at_ns=1)
        with pytest.raises(ValueError, match="until="):
            bench.chip.fail("led", until=-1.0)
        bench.clock.run_until(1500)
        assert bench.chip.value("button") == 1
        bench.clock.run_until(2500)
        assert bench.chip.value("button") == 0
        assert (fault.start_ns, fault.end_ns) == (3000, 4000)
    finally:
        bench.chip.close()
        bench.requests.memory.unmap()


def test_a_devices_now_is_seconds_and_its_old_meaning_warns_once(tmp_path: Path) -> None:
    bench = Bench(tmp_path / "gpio.sock")
    try:
        bench.clock.run_until(1_500_000_000)
        assert bench.chip.now_ns == 1_500_000_000
        with pytest.warns(UnitChangedWarning, match=r"VirtioDevice\.now is virtual seconds.*"
                                                    r"use VirtioDevice\.now_ns"):
            assert bench.chip.now == 1.5
        with pytest.warns() as again:
            assert bench.chip.now == 1.5
            warnings.warn("a marker", UserWarning, stacklevel=1)
        assert [type(w.message) for w in again] == [UserWarning]  # once per process
    finally:
        bench.chip.close()
        bench.requests.memory.unmap()
