"""The guest agent's two command channels side by side, against issue 14's targets:
virtio-console (the agent blocks on /dev/hvc0; the default) and polled files (the
fallback for kernels without virtio-console). Runs interleaved, pinned root.

Numbers: a command's wall round trip (`run("true")`, median of 20), messages per
command (time-travel messages plus vhost-user messages), wall time of `advance(3600)`
on an idle machine against `run("sleep 3600")`, and how late a command submitted after
idling starts (virtual).

Run: python bench/agent_channel.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt import Machine, Simulation
from pytest_umtt.rootfs import Rootfs, build_rootfs

CHANNELS = {"console": True, "files": False}


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def messages(sim: Simulation, machine: Machine) -> int:
    count = sim.calendar.messages_received + sim.calendar.messages_sent
    for device in machine.devices:
        if device.backend is not None:
            count += device.backend.messages_received + device.backend.messages_sent
    return count


def one_run(rootfs: Rootfs, console: bool) -> dict[str, float]:
    with Simulation(rootfs=rootfs) as sim:
        uml = sim.machine("bench", agent_console=console)
        uml.run("true")  # warm the agent's path once
        round_trip = statistics.median(timed(lambda: uml.run("true")) for _ in range(20))
        before = messages(sim, uml)
        uml.run("true")
        per_command = messages(sim, uml) - before
        idle = timed(lambda: sim.advance(3600))
        sleep = timed(lambda: uml.run("sleep 3600"))
        sim.advance(0.0123)
        submitted = sim.now
        late = (uml.run("true").started - submitted) * 1000
    return {"round_trip": round_trip * 1000, "messages": per_command, "idle": idle,
            "sleep": sleep, "ratio": idle / sleep, "late": late}


ROWS = (  # key, label, unit, target
    ("round_trip", 'run("true")', "ms wall", "<= 20"),
    ("messages", "messages per command", "", "<= 4"),
    ("idle", "advance(3600), idle", "s wall", ""),
    ("sleep", 'run("sleep 3600")', "s wall", ""),
    ("ratio", "idle / sleep", "", "<= 3"),
    ("late", "start after idling", "ms virtual", "0"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rootfs = build_rootfs()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CHANNELS}
    for _ in range(args.runs):
        for name, console in CHANNELS.items():
            results[name].append(one_run(rootfs, console))
    print(f"{'':28} {'console':>10} {'files':>10}   target   (median of {args.runs} runs)")
    for key, label, unit, target in ROWS:
        cells = [statistics.median(run[key] for run in results[name]) for name in CHANNELS]
        print(f"{label + ' ' + unit:28} {cells[0]:>10.3f} {cells[1]:>10.3f}   {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
