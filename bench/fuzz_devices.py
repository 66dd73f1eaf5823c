"""Fuzz the device models with hostile frontends for a while, and count what went wrong.

Inputs come from tests/device_fuzzing.py (hypothesis): a device type (console, rng,
gpio, net) and up to 40 actions of a kernel's side gone bad: any message, memory
tables good and bad, rings of any size, descriptors and available entries written into
memory, kicks, the memory file shrunk, rings disabled, config reads, interrupts left
unanswered, and host-side traffic meanwhile. The inputs run in a worker process, so a
crash of it (a SIGBUS, say) is counted rather than ending the run; the worker is then
started again.

Counted: inputs tried; host crashes (the worker died); hangs (an input over the
per-input wall bound); escapes (an exception out of a device, or a descriptor not given
back); the worker's memory (RSS) and descriptors after the first batch and at the end.

``--mapped`` accesses guest memory through mappings, as before docs/DESIGN.md fact 26,
to see that the fuzzer finds what that costs (host crashes: SIGBUS).

Run: python bench/fuzz_devices.py --minutes 10 [--mapped]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from hypothesis import HealthCheck, given, settings

from tests.device_fuzzing import Action, inputs, play
from tests.hostile_frontend import mapped_access

BATCH = 200
MiB = 1 << 20


class Hang(BaseException):
    """An input ran past its wall bound (a BaseException: no device may swallow it)."""


def _alarm(_signum: int, _frame: FrameType | None) -> None:
    raise Hang


def worker(seconds: float, bound: float, mapped: bool) -> None:
    """Play inputs for ``seconds``, one JSON line of counts per batch on stdout."""
    if mapped:
        memory = importlib.import_module("pytest_umtt.devices.guest_memory").GuestMemory
        for name, function in mapped_access()[1].items():
            setattr(memory, name, function)
    signal.signal(signal.SIGALRM, _alarm)
    counts = {"inputs": 0, "actions": 0, "failed": 0, "hangs": 0, "escapes": 0}
    escapes: list[str] = []

    @settings(max_examples=BATCH, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=inputs)
    def batch(case: tuple[str, list[Action]]) -> None:
        device, steps = case
        counts["inputs"] += 1
        signal.setitimer(signal.ITIMER_REAL, bound)
        try:
            result = play(device, steps)
            counts["actions"] += result["actions"]
            counts["failed"] += result["failed"]
        except Hang:
            counts["hangs"] += 1
            escapes.append(f"hang: {case!r}")
        except Exception:  # an escape: reported with its input, not shrunk
            counts["escapes"] += 1
            escapes.append(f"{traceback.format_exc(limit=4)}input: {case!r}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    process = psutil.Process()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        batch()
        report = dict(counts, rss=process.memory_info().rss,
                      fds=len(os.listdir("/proc/self/fd")), escapes_seen=escapes[-3:])
        print(json.dumps(report), flush=True)


def run(minutes: float, bound: float, mapped: bool) -> dict[str, Any]:
    """Start workers until the time is up; what they reported, and their crashes."""
    end = time.monotonic() + minutes * 60
    totals = {"inputs": 0, "actions": 0, "failed": 0, "hangs": 0, "escapes": 0}
    crashes, examples = 0, []
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    while (left := end - time.monotonic()) > 1:
        # A worker that dies leaves its inputs' directories: they go with its scratch.
        with tempfile.TemporaryDirectory(prefix="umtt-fuzz-worker-") as scratch:
            child = subprocess.Popen(
                [sys.executable, __file__, "--worker", str(left), "--bound", str(bound),
                 *(["--mapped"] if mapped else [])],
                stdout=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=scratch))
            assert child.stdout is not None
            reported: dict[str, Any] = {}
            for line in child.stdout:
                reported = json.loads(line)
                first = first or reported
                last = reported
                examples += [e for e in reported["escapes_seen"] if e not in examples]
            if child.wait() < 0:
                crashes += 1
                print(f"worker died of signal {-child.returncode}", file=sys.stderr)
        for key in totals:
            totals[key] += int(reported.get(key, 0))
    return {"totals": totals, "crashes": crashes, "first": first, "last": last,
            "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--bound", type=float, default=10.0,
                        help="wall seconds an input may take before it counts as a hang")
    parser.add_argument("--mapped", action="store_true",
                        help="guest memory through mappings (to see the fuzzer find SIGBUS)")
    parser.add_argument("--worker", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.bound, args.mapped)
        return
    began = time.monotonic()
    result = run(args.minutes, args.bound, args.mapped)
    totals, first, last = result["totals"], result["first"], result["last"]
    wall = time.monotonic() - began
    print(f"| inputs | actions | devices failed (clear error) | host crashes | hangs "
          f"(> {args.bound:g} s) | escapes | RSS after batch 1 -> end | fds |")
    print("|---|---|---|---|---|---|---|---|")
    rss = fds = "-"
    if first and last:
        rss = f"{first['rss'] / MiB:.0f} -> {last['rss'] / MiB:.0f} MiB"
        fds = f"{first['fds']} -> {last['fds']}"
    print(f"| {totals['inputs']} | {totals['actions']} | {totals['failed']} | "
          f"{result['crashes']} | {totals['hangs']} | {totals['escapes']} | {rss} | {fds} |")
    print(f"({wall:.0f} s wall)")
    for example in result["examples"][:5]:
        print("---\n" + example)


if __name__ == "__main__":
    main()
