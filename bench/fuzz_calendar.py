"""Fuzz the calendar with random and malformed client streams for a while.

Hypothesis generates streams (tests/fuzzing.py): well-formed and ill-formed messages
with edge-case times, raw bytes of any length, shared-memory writes, ACKs, departures,
newcomers and runs. Any exception from the calendar, a clock going back, a RUN at or
beyond S64_MAX or a wrong running_id counts as a failure and is shown, shrunk.

Run: python bench/fuzz_calendar.py --minutes 3
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import play, streams

BATCH = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    args = parser.parse_args()
    counts: collections.Counter[str] = collections.Counter()

    @settings(max_examples=BATCH, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(stream=streams, shm=st.booleans(), expected=st.integers(0, 2))
    def fuzz(stream: list[tuple[object, ...]], shm: bool, expected: int) -> None:
        counts.update(play(stream, shm, expected))
        counts["streams"] += 1
        for action in stream:
            counts[f"action:{action[0]}"] += 1

    began = time.monotonic()
    batches = 0
    while time.monotonic() - began < args.minutes * 60:
        fuzz()  # raises, with the shrunk stream, on the first failure
        batches += 1
    wall = time.monotonic() - began
    print(f"{counts['streams']} streams, {counts['actions']} actions in {wall:.0f} s "
          f"({batches} batches of {BATCH}): 0 crashes, 0 clocks going back")
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())
                           if not k.startswith("action:")))
    print("  " + ", ".join(f"{k[7:]}={v}" for k, v in sorted(counts.items())
                           if k.startswith("action:")))


if __name__ == "__main__":
    main()
