"""A short, bounded run of the calendar fuzzer (bench/fuzz_calendar.py runs it for minutes)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import FuzzWorld, InvariantBroken, play, streams


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, shm=st.booleans(), expected=st.integers(0, 2))
def test_random_streams_never_break_the_calendar(stream: list[tuple[object, ...]],
                                                 shm: bool, expected: int) -> None:
    assert play(stream, shm, expected)["actions"] == len(stream)


def test_the_fuzzer_notices_a_clock_going_back() -> None:
    """The checks can fail: a clock moved back behind the calendar's back is caught."""
    world = FuzzWorld(shm=True, expected=0)
    try:
        world.play([("kernel", 0, "start", 1), ("kernel", 0, "request", 500),
                    ("kernel", 0, "wait", 0)])
        world.calendar.clock.now = 0
        caught = False
        try:
            world.check()
        except InvariantBroken:
            caught = True
        assert caught
    finally:
        world.close()
