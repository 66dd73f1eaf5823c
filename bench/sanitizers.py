"""What the sanitizer kernel (umtt-kernel build --debug) costs: one machine's boot to
ready and a command's round trip on each kernel, then the example suite under pytest
with and without --umtt-debug-kernel (outcomes, wall time, slowdown).

Both kernels must be built (umtt-kernel build; umtt-kernel build --debug).

Run: python bench/sanitizers.py [--runs N] [--suite DIR] [--no-suite]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt import KernelConfig, Simulation
from pytest_umtt.kernel import default_kernel, variant_kernel
from pytest_umtt.rootfs import build_rootfs

ROOT = Path(__file__).resolve().parent.parent
OUTCOME = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)")


def kernels() -> dict[str, Path]:
    default, debug = default_kernel(), variant_kernel(KernelConfig(debug=True))
    for name, path in (("default", default), ("debug", debug)):
        if path is None or not path.is_file():
            flag = " --debug" if name == "debug" else ""
            sys.exit(f"no {name} kernel: build it with umtt-kernel build{flag}")
    assert default is not None
    return {"default": default, "debug": debug}


def machine_numbers(kernel: Path, runs: int) -> tuple[float, float, int]:
    """Median boot to ready and command round trip (wall s), and the splats seen."""
    boots, trips, splats = [], [], 0
    rootfs = build_rootfs()
    for _ in range(runs):
        with Simulation(kernel=kernel, rootfs=rootfs) as sim:
            started = time.perf_counter()
            machine = sim.machine("bench")
            boots.append(time.perf_counter() - started)
            machine.run("true")
            for _ in range(10):
                started = time.perf_counter()
                machine.run("true")
                trips.append(time.perf_counter() - started)
            splats += len(machine.splats)
    return statistics.median(boots), statistics.median(trips), splats


def suite_run(suite: Path, debug: bool) -> tuple[float, str]:
    """Wall seconds of one pytest run of ``suite`` and its outcome counts."""
    command = [sys.executable, "-m", "pytest", str(suite), "-q", "-p", "no:cacheprovider",
               *(["--umtt-debug-kernel"] if debug else [])]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = ", ".join(f"{n} {what}" for n, what in OUTCOME.findall(last)) or last[-80:]
    return wall, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    parser.add_argument("--suite", type=Path, default=ROOT / "example_suite")
    parser.add_argument("--no-suite", action="store_true", help="machines only")
    args = parser.parse_args()
    found = kernels()
    print(f"{'kernel':8} {'boot s':>8} {'round trip ms':>14} {'splats':>7}  binary")
    numbers = {}
    for name, path in found.items():
        numbers[name] = machine_numbers(path, args.runs)
        boot, trip, splats = numbers[name]
        print(f"{name:8} {boot:8.2f} {trip * 1000:14.1f} {splats:7}  {path}", flush=True)
    slower = numbers["debug"][0] / numbers["default"][0]
    print(f"debug boot: {slower:.1f}x the default kernel's\n")
    if args.no_suite:
        return
    print(f"{'suite run':22} {'wall s':>8} {'slowdown':>9}  outcomes")
    walls: dict[bool, list[float]] = {False: [], True: []}
    for run in range(args.runs):
        for debug in (False, True):  # interleaved: the machine's load hits both alike
            wall, counts = suite_run(args.suite, debug)
            walls[debug].append(wall)
            label = f"{'--umtt-debug-kernel' if debug else 'default'} #{run + 1}"
            print(f"{label:22} {wall:8.1f} {'':9}  {counts}", flush=True)
    plain, debug_wall = statistics.median(walls[False]), statistics.median(walls[True])
    print(f"{'median default':22} {plain:8.1f}")
    print(f"{'median debug':22} {debug_wall:8.1f} {debug_wall / plain:8.2f}x")


if __name__ == "__main__":
    main()
