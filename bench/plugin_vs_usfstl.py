"""The plugin's own path against usfstl's C controller, side by side, and where the
plugin's time goes.

Workload (per machine, as a background command; the loop is timed, boots are not):

    read:  mkfifo /tmp/f; for i in $(seq 1000); do read -t 0.001 <> /tmp/f; done
    sleep: for i in $(seq 500); do sleep 0.001; done        (a fork per wake-up)

Sides, each run in turn within a pair (the order rotating from pair to pair):

    plugin         what a test gets: a Simulation with the pinned root, placed on one CPU
                   (the default, pytest_umtt/placement.py), machines booted together
                   (``sim.boot``), each running the loop with ``Machine.start``, waited
                   for with ``BackgroundCommand.wait``; boots not timed.
    plugin-spread  the same, unplaced (``cpu=None``, --umtt-cpu=off): the host scheduler
                   spreads kernels and calendar over the CPUs (what the plugin did before).
    usfstl         usfstl's controller as it ships, with bare kernels
                   (bench/kernels_vs_usfstl.py's guest, hostfs root) running the same loop,
                   boots included (which counts against usfstl).
    usfstl-1cpu    the same, controller and kernels given one CPU (taskset): usfstl with
                   the plugin's placement, the like-for-like comparison.

The ratios are taken pair by pair (plugin/usfstl, plugin/usfstl-1cpu), their median shown.

Besides wall seconds the table shows CPU seconds of the controller (the pytest process
for the plugin, usfstl's process), and for the plugin the counts that say where the
time goes: time-travel messages and vhost-user messages per guest wake-up, how many of
the calendar's waits slept in epoll_wait and how many were answered while spinning.

usfstl is not part of this project: build it yourself (git clone
linux-test-project/usfstl; make -C control) and pass its controller's path.

Run: python bench/plugin_vs_usfstl.py --usfstl /path/to/usfstl/control/controller
     [--machines 1,2,4,8] [--pairs 5] [--workload read|sleep] [--sides plugin,usfstl,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.kernels_vs_usfstl import guests_finished, usfstl_controller
from pytest_umtt import Simulation
from pytest_umtt.kernel import default_kernel
from pytest_umtt.placement import choose_cpu
from pytest_umtt.rootfs import Rootfs, build_rootfs
from pytest_umtt.uml.launch import uml_command

LOOPS = {
    "read": ("mkfifo /tmp/f; for i in $(seq 1000); do read -t 0.001 <> /tmp/f; done", 1000),
    "sleep": ("for i in $(seq 500); do sleep 0.001; done", 500),
}

USFSTL_GUEST = """#!/bin/bash
mount -t proc proc /proc
mount -t tmpfs tmpfs /tmp  # the host's root is read-only through hostfs
{loop}
echo "done $EPOCHREALTIME"
echo o > /proc/sysrq-trigger
sleep 10
"""


@dataclass
class Run:
    """One timed run: wall and controller CPU seconds, and the plugin's counters."""

    wall: float
    cpu: float
    counts: dict[str, float] = field(default_factory=dict)


def plugin_run(rootfs: Rootfs, machines: int, loop: str, placed: bool = True) -> Run:
    with Simulation(rootfs=rootfs, cpu="auto" if placed else None) as sim:
        started = [sim.machine(f"m{n}", boot=False) for n in range(1, machines + 1)]
        sim.boot(*started)
        before = _counters(sim)
        cpu, wall = time.process_time(), time.perf_counter()
        commands = [machine.start(loop) for machine in started]
        for command in commands:
            result = command.wait()
            if result.status not in (0, 128 + 14):  # read -t's last timeout: 142
                raise RuntimeError(f"{command.machine.name}: {result}: {result.stderr!r}")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = _counters(sim)
        counts = {key: after[key] - before[key] for key in after}
        counts["free_run_bound_ms"] = (sim.calendar.max_free_run or 0) / 1e6
    return Run(wall, cpu, counts)


def _counters(sim: Simulation) -> dict[str, float]:
    calendar = sim.calendar
    device = sum(d.backend.messages_received + d.backend.messages_sent
                 for m in sim.machines.values() for d in m.devices if d.backend is not None)
    kernels = sum(_tree_cpu(m.process.pid) for m in sim.machines.values()
                  if m.process is not None and m.process.pid is not None)
    return {"tt_messages": calendar.messages_received + calendar.messages_sent,
            "vu_messages": device, "runs": calendar.runs, "uml_cpu": kernels,
            **calendar.reactor_stats()}


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a UML process and every process it made (reaped ones too)."""
    total = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    except psutil.NoSuchProcess:
        pass
    return total


def usfstl_run(controller: list[str], kernel: Path, machines: int, loop: str,
               cpu: int | None = None) -> Run:
    """usfstl and bare kernels; given ``cpu``, all of them on that CPU (taskset)."""
    pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
    with tempfile.TemporaryDirectory() as tmp:
        sim = Path(tmp)
        with usfstl_controller([*pin, *controller], sim / "time.sock", machines) as ctl:
            started = time.perf_counter()
            guests = [_start_guest(kernel, sim, n, loop, pin) for n in range(1, machines + 1)]
            for guest in guests:
                guest.wait(timeout=600)
            wall = time.perf_counter() - started
            controller_cpu = _cpu_seconds(ctl.pid)
        guests_finished(sim, machines)
        return Run(wall, controller_cpu)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_guest(kernel: Path, sim: Path, n: int, loop: str,
                 pin: list[str]) -> subprocess.Popen[bytes]:
    machine = sim / f"m{n}"
    machine.mkdir()
    boot = machine / "boot.sh"
    boot.write_text(USFSTL_GUEST.format(loop=loop))
    boot.chmod(0o755)
    command = [*pin, *uml_command(kernel, client_id=n, mem="64M")]
    with (machine / "console.log").open("wb") as out:
        return subprocess.Popen(command, cwd=machine, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def spread(values: list[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}..{max(values):.{digits}f})")


SIDES = ("plugin", "plugin-spread", "usfstl", "usfstl-1cpu")
RATIOS = (("plugin", "usfstl"), ("plugin", "usfstl-1cpu"), ("plugin-spread", "usfstl"))
Rows = dict[int, dict[str, list[Run]]]


def measure(args: argparse.Namespace, rootfs: Rootfs, machines: int,
            loop: str) -> dict[str, list[Run]]:
    """``args.pairs`` rounds of every side, the order rotating from round to round."""
    sides = [side for side in args.sides if args.usfstl or not side.startswith("usfstl")]
    cpu = choose_cpu("auto")
    runners: dict[str, Callable[[], Run]] = {
        "plugin": lambda: plugin_run(rootfs, machines, loop),
        "plugin-spread": lambda: plugin_run(rootfs, machines, loop, placed=False),
        "usfstl": lambda: usfstl_run([str(args.usfstl)], args.kernel, machines, loop),
        "usfstl-1cpu": lambda: usfstl_run([str(args.usfstl)], args.kernel, machines, loop,
                                          cpu),
    }
    runs: dict[str, list[Run]] = {side: [] for side in sides}
    for pair in range(args.pairs):
        shift = pair % len(sides)
        for side in sides[shift:] + sides[:shift]:
            runs[side].append(runners[side]())
    return runs


def side_by_side(rows: Rows) -> None:
    sides = list(next(iter(rows.values())))
    ratios = [(a, b) for a, b in RATIOS if a in sides and b in sides]
    print(f"{'machines':>8} " + " ".join(f"{f'{side} wall s':>24} {'cpu s':>18}"
                                         for side in sides)
          + " " + " ".join(f"{f'{a}/{b}':>26}" for a, b in ratios))
    for machines, runs in rows.items():
        cells = [f"{spread([r.wall for r in runs[side]]):>24} "
                 f"{spread([r.cpu for r in runs[side]]):>18}" for side in sides]
        cells += [f"{spread([x.wall / y.wall for x, y in zip(runs[a], runs[b], strict=True)]):>26}"
                  for a, b in ratios]
        print(f"{machines:>8} " + " ".join(cells))
    one = next(iter(rows.values()))
    print(f"\n{'x one machine':>14} " + " ".join(f"{side:>14}" for side in sides))
    for machines, runs in rows.items():
        print(f"{machines:>14} " + " ".join(
            f"{_median_wall(runs[side]) / _median_wall(one[side]):>14.2f}" for side in sides))


def _median_wall(runs: list[Run]) -> float:
    return statistics.median(run.wall for run in runs)


Figure = Callable[[Run, int], float]
WHERE: tuple[tuple[str, Figure, str], ...] = (  # label, a run's figure, its format
    ("round trips / wake-up", lambda r, w: r.counts["runs"] / w, "{:.1f}"),
    ("tt messages / wake-up", lambda r, w: r.counts["tt_messages"] / w, "{:.1f}"),
    ("vhost-user msgs / wake-up", lambda r, w: r.counts["vu_messages"] / w, "{:.3f}"),
    ("wall us / round trip", lambda r, w: _per_run(r, r.wall), "{:.0f}"),
    ("ctl CPU us / round trip", lambda r, w: _per_run(r, r.cpu), "{:.1f}"),
    ("ctl CPU us / message", lambda r, w: _per(r.cpu, r.counts["tt_messages"])
     if _has_round_trips(r) else float("nan"), "{:.1f}"),
    ("WAIT->RUN written us", lambda r, w: _per(r.counts["reaction_time"],
                                                r.counts["reactions"])
     if _has_round_trips(r) else float("nan"), "{:.1f}"),
    ("kernels' CPU us / round trip", lambda r, w: _per_run(r, r.counts["uml_cpu"]), "{:.0f}"),
    ("ctl sleeps / round trip", lambda r, w: _share(r, "sleeps"), "{:.2f}"),
    ("answered spinning / round trip", lambda r, w: _share(r, "spun"), "{:.2f}"),
    ("free-run bound while awaited ms", lambda r, w: r.counts["free_run_bound_ms"], "{:.0f}"),
)


def _per(total: float, count: float) -> float:
    return total / count * 1e6 if count else float("nan")


def _per_run(run: Run, seconds: float) -> float:
    return _per(seconds, run.counts["runs"]) if _has_round_trips(run) else float("nan")


def _share(run: Run, key: str) -> float:
    return run.counts[key] / run.counts["runs"] if _has_round_trips(run) else float("nan")


def _has_round_trips(run: Run) -> bool:
    """A lone machine free-runs: its few round trips say nothing per round trip."""
    return run.counts["runs"] >= 100


def where_the_time_goes(rows: Rows, wakeups: int) -> None:
    for side in ("plugin", "plugin-spread"):
        if side not in next(iter(rows.values())):
            continue
        print(f"\nwhere {side}'s time goes (medians; a wake-up is one loop turn of one "
              f"machine; a round trip is one RUN..WAIT)")
        print(f"{'':32} " + " ".join(f"{f'{m} machines':>12}" for m in rows))
        for label, figure, shape in WHERE:
            cells = [shape.format(statistics.median(figure(run, machines * wakeups)
                                                    for run in runs[side]))
                     for machines, runs in rows.items()]
            print(f"{label:32} " + " ".join(f"{cell:>12}" for cell in cells))


def _sides(text: str) -> list[str]:
    sides = [side for side in text.split(",") if side]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown or not any(side.startswith("plugin") for side in sides):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(SIDES)} with at "
                                         f"least one plugin side, got {text!r}")
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--usfstl", type=Path, help="usfstl's built control/controller")
    parser.add_argument("--kernel", type=Path, default=default_kernel())
    parser.add_argument("--machines", default="1,2,4,8")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--workload", choices=LOOPS, default="read")
    parser.add_argument("--sides", type=_sides, default=list(SIDES),
                        help=f"which of {', '.join(SIDES)} to run (default: all)")
    args = parser.parse_args()
    if args.kernel is None:
        sys.exit("no kernel: run `umtt-kernel build` or pass --kernel")
    loop, wakeups = LOOPS[args.workload]
    rootfs = build_rootfs()
    print(f"workload {args.workload!r}: {loop}")
    print(f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(1, 5, 15 min), {os.cpu_count()} cores; {args.pairs} pairs per row, "
          f"medians (min..max); usfstl's walls include its kernels' boots, the plugin's "
          f"do not", flush=True)
    rows: Rows = {}
    for machines in [int(n) for n in args.machines.split(",")]:
        rows[machines] = measure(args, rootfs, machines, loop)
        print(f"  {machines} machines done", flush=True)
    side_by_side(rows)
    where_the_time_goes(rows, wakeups)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
