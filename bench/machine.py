"""Machine-level numbers against their targets: boot to ready, a command's round trip,
`sleep 3600`, messages per command with shared memory, virtual/wall speedup; with the
pinned root filesystem and with the host's root, runs interleaved.

Run: python bench/machine.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt import Machine, MachineCrashed, Simulation
from pytest_umtt.rootfs import Rootfs, build_rootfs


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def messages(sim: Simulation) -> int:
    return sim.calendar.messages_received + sim.calendar.messages_sent


def one_run(rootfs: Rootfs | None) -> dict[str, float]:
    with Simulation(rootfs=rootfs) as sim:
        machine: list[Machine] = []
        ready = timed(lambda: machine.append(sim.machine("bench")))
        uml = machine[0]
        uml.run("true")  # warm the agent's path once
        round_trip = statistics.median(timed(lambda: uml.run("true")) for _ in range(20))
        before = messages(sim)
        uml.run("true")
        per_command = messages(sim) - before
        virtual_before = sim.now
        sleep_wall = timed(lambda: uml.run("sleep 3600"))
        speedup = (sim.now - virtual_before) / sleep_wall
        crash = timed(lambda: expect_crash(uml))
    return {"ready": ready, "round_trip": round_trip, "sleep": sleep_wall,
            "messages": per_command, "speedup": speedup, "crash": crash}


def expect_crash(machine: Machine) -> None:
    try:
        machine.run("echo c > /proc/sysrq-trigger")
    except MachineCrashed:
        return
    raise AssertionError("the panic went unnoticed")


ROWS = (  # key, label, unit, target, lower is better
    ("ready", "boot to ready", "s wall", 0.25, True),
    ("round_trip", 'run("true") round trip', "s wall", 0.015, True),
    ("sleep", 'run("sleep 3600")', "s wall", 0.15, True),
    ("messages", "messages per command (shm)", "", 4, True),
    ("speedup", "virtual/wall speedup (sleep 3600)", "x", None, False),
    ("crash", "panic to MachineCrashed raised", "s wall", 1.0, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    roots = {"pinned root": build_rootfs(), "host root": None}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in roots}
    for _ in range(args.runs):
        for name, rootfs in roots.items():
            runs[name].append(one_run(rootfs))
    print(f"median of {args.runs} runs")
    print(f"{'what':<36} " + " ".join(f"{name:>16}" for name in roots) + f" {'target':>10}  ok")
    for key, label, unit, target, lower in ROWS:
        values = [statistics.median(run[key] for run in runs[name]) for name in roots]
        shown = [f"{v:.0f}" if key in ("messages", "speedup") else f"{v:.4f}" for v in values]
        if target is None:
            verdict, wanted = "", ""
        else:
            verdict = "/".join("yes" if (v <= target if lower else v >= target) else "NO"
                               for v in values)
            wanted = f"<= {target:g}"
        print(f"{label:<36} " + " ".join(f"{text + ' ' + unit:>16}" for text in shown)
              + f" {wanted:>10}  {verdict}")


if __name__ == "__main__":
    main()
