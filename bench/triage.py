"""Triage measured on the flaky network example (example_suite/test_flaky_network.py):

1. --umtt-explore=N: how many seeds fail, the rate with its 95% interval, the signature
   groups, and the wall time;
2. --umtt-shrink on the first seed of each group, with and without --umtt-perturb:
   perturbed decisions before and after, reruns, wall time;
3. --umtt-schedule replays each written schedule: does it fail with the same signature?

Run: python bench/triage.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEST = "example_suite/test_flaky_network.py::test_updates_are_applied_in_the_order_sent"
SHRINK_LINE = re.compile(r"\): (?P<before>.*) -> (?P<after>.*?) \((?P<reruns>\d+) reruns")


def pytest(*args: str) -> tuple[str, float]:
    """A child pytest run's output and its wall time."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           TEST, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout, time.perf_counter() - started


def explore(seeds: int, work: Path) -> dict[str, Any]:
    summary = work / "explore.json"
    output, wall = pytest(f"--umtt-explore={seeds}", f"--umtt-explore-json={summary}")
    (test,) = json.loads(summary.read_text())["tests"]
    line = next(line for line in output.splitlines() if line.startswith("explore:"))
    print(f"explore, {seeds} seeds: {line.split(': ', 2)[2]}  ({wall:.1f} s wall)")
    for group in test["groups"]:
        print(f"  {len(group['seeds']):3} ({', '.join(map(str, group['seeds']))}): "
              f"{group['signature']}")
    return dict(test)


def shrink(seed: int, perturb: bool, work: Path) -> None:
    artifacts = work / f"seed{seed}-{perturb}"
    flags = ["--umtt-perturb"] if perturb else []
    output, wall = pytest(f"--umtt-seed={seed}", *flags, "--umtt-shrink",
                          f"--umtt-artifacts={artifacts}")
    found = SHRINK_LINE.search(output)
    schedule_files = list(artifacts.glob("*/schedule.json"))
    replayed = "-"
    if schedule_files:
        schedule = json.loads(schedule_files[0].read_text())
        pytest(f"--umtt-schedule={schedule_files[0]}", "--junitxml", str(work / "replay.xml"))
        xml = (work / "replay.xml").read_text().replace("&lt;", "<").replace("&gt;", ">")
        replayed = "same failure" if f'value="{schedule["signature"]}"' in xml else "DIFFERS"
    before, after, reruns = (found["before"], found["after"], found["reruns"]) if found \
        else ("?", "?", "?")
    print(f"| {seed} | {'yes' if perturb else 'no'} | {before} | {after} | {reruns} | "
          f"{wall:.1f} s | {replayed} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="umtt-triage-") as directory:
        work = Path(directory)
        test = explore(args.seeds, work)
        print("\n| seed | --umtt-perturb | decisions before | after | reruns | wall "
              "(whole run) | replay |\n|---|---|---|---|---|---|---|")
        for group in test["groups"]:
            for perturb in (False, True):
                shrink(group["seeds"][0], perturb, work)


if __name__ == "__main__":
    main()
