"""The clock alone: no sockets, no protocol."""

from __future__ import annotations

import functools
import random

import pytest

from pytest_umtt.controller.clock import Clock
from pytest_umtt.errors import ClockError


def test_the_clock_refuses_to_go_back_and_names_both_times() -> None:
    clock = Clock()
    clock.move_to(1_500)
    with pytest.raises(ClockError, match=r"from 0\.000001500 s to 0\.000001000 s") as info:
        clock.move_to(1_000)
    assert (info.value.now_ns, info.value.when_ns) == (1_500, 1_000)
    assert (info.value.now, info.value.when) == (1.5e-6, 1e-6)  # seconds, as at the user API
    assert clock.now == 1_500


def test_the_repr_shows_the_time() -> None:
    clock = Clock()
    clock.move_to(2_000_000_001)
    assert repr(clock) == "<Clock now=2.000000001 s>"


def run_ties(ties: random.Random | None) -> list[str]:
    clock = Clock(ties=ties)
    order: list[str] = []
    for name in "abcdefgh":
        clock.call_at(100, functools.partial(order.append, name), name)
    assert clock.run_until(100) == 8
    return order


def test_ties_are_fifo_or_follow_the_seeded_stream() -> None:
    assert run_ties(None) == list("abcdefgh")
    assert run_ties(random.Random(5)) == run_ties(random.Random(5))
    assert {"".join(run_ties(random.Random(seed))) for seed in range(6)} - {"abcdefgh"}


def test_calls_run_in_time_order_and_cancelled_ones_not_at_all() -> None:
    clock = Clock()
    seen: list[tuple[str, int]] = []
    late = clock.call_at(300, lambda: seen.append(("late", clock.now)))
    clock.call_at(100, lambda: seen.append(("early", clock.now)))
    dropped = clock.call_at(200, lambda: seen.append(("dropped", clock.now)))
    dropped.cancel()
    assert (late.time, dropped.time) == (300, None)
    assert clock.run_until(250) == 1 and clock.now == 250
    assert clock.run_until(1_000) == 1 and clock.now == 1_000
    assert seen == [("early", 100), ("late", 300)]
    with pytest.raises(ValueError, match="already at"):
        clock.call_at(999, lambda: None)
