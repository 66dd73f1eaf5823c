"""Wall time of 4 real UML kernels, each doing 1,000 timer wake-ups, under
umtt-controller and under usfstl's C controller, side by side in one run.

Each guest wakes 1,000 times (bash's builtin `read -t`, no process creation) with its
own period (1.0, 1.1, 1.2, 1.3 ms), so the kernels interleave and every wake-up goes
through the controller. usfstl's controller is not part of this project: build it
yourself (git clone linux-test-project/usfstl; make -C control) and pass its path.

Runs come in pairs, one per controller, the order alternating from pair to pair so that
load drift and warm caches favour neither; the ratio shown is the median of the pairs'
ratios (umtt-controller / usfstl), with the spread of those ratios beside it.

Run: python bench/kernels_vs_usfstl.py --usfstl /path/to/usfstl/control/controller

Measured 2026-11 on 2 shared cores (Debian 12, UML 6.12, usfstl 1557f58 built with its
own Makefile), 7 pairs, other jobs running on the machine:

    mode      umtt-controller  usfstl  ratio (min..max)      second run
    shm       2.224            3.344   0.65  (0.48..0.93)    0.90  (0.41..0.99)
    messages  2.407            3.427   0.69  (0.66..0.81)    0.96  (0.84..1.11)

Both controllers exchange the same messages (about 7,000 WAIT/RUN pairs in shm mode).
umtt-controller wins on latency, not on work: it spins up to 2 ms (``--busy-poll``) for
the running kernel's next message instead of sleeping in epoll_wait, which costs about
1.7 s of CPU per run against usfstl's 0.25 s. Without the spin the ratio was 1.20 in shm
mode: each WAIT->RUN costs ~20 us of Python (receive, collect the shm requests in one
read, pick the next job, publish the horizon, write the RUN), and the write that wakes
the next kernel is the largest single item in a py-spy profile.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt.kernel import default_kernel
from pytest_umtt.uml.launch import uml_command

GUEST = """#!/bin/bash
mount -t proc proc /proc
mount -t tmpfs tmpfs /run  # the host's root is read-only through hostfs
mkfifo /run/idle; exec 3<>/run/idle
for ((i = 0; i < 1000; i++)); do read -t "$PERIOD" -u 3; done
echo "done $EPOCHREALTIME"
echo o > /proc/sysrq-trigger
sleep 10
"""
KERNELS = 4


@contextmanager
def usfstl_controller(controller: list[str], socket_path: Path, clients: int,
                      *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """usfstl's controller for ``clients`` kernels, once its socket is there; killed after."""
    ctl = subprocess.Popen([*controller, f"--time={socket_path}", f"--clients={clients}",
                            *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not socket_path.exists():
            if ctl.poll() is not None:
                raise RuntimeError(f"{controller[0]} exited with {ctl.returncode}")
            time.sleep(0.005)  # bench start-up only: waits for the socket to appear
        yield ctl
    finally:
        ctl.kill()
        ctl.wait()


def guests_finished(sim: Path, machines: int, failure: str = "") -> None:
    """Each guest's console says it finished its loop (and not ``failure``)."""
    for n in range(1, machines + 1):
        log = (sim / f"m{n}" / "console.log").read_text(errors="replace")
        if "done " not in log or (failure and failure in log):
            raise RuntimeError(f"guest m{n} did not finish:\n{log[-1500:]}")


def run_once(controller: list[str], kernel: Path, shm: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sim = Path(tmp)
        with usfstl_controller(controller, sim / "time.sock", KERNELS,
                               *([] if shm else ["--no-shm"])):
            started = time.perf_counter()
            guests = [start_guest(kernel, sim, n) for n in range(1, KERNELS + 1)]
            for guest in guests:
                guest.wait(timeout=300)
            wall = time.perf_counter() - started
        guests_finished(sim, KERNELS, "Bad file descriptor")
        return wall


def start_guest(kernel: Path, sim: Path, n: int) -> subprocess.Popen[bytes]:
    machine = sim / f"m{n}"
    machine.mkdir()
    boot = machine / "boot.sh"
    boot.write_text(GUEST)
    boot.chmod(0o755)
    period = f"0.00{10 + n - 1:02d}"[:-1] + str(n - 1)  # 0.0010 .. 0.0013
    command = uml_command(kernel, client_id=n, mem="64M", extra=[f"PERIOD={period}"])
    with (machine / "console.log").open("wb") as out:
        return subprocess.Popen(command, cwd=machine, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--usfstl", type=Path, help="usfstl's built control/controller")
    parser.add_argument("--kernel", type=Path, default=default_kernel())
    parser.add_argument("--runs", type=int, default=7, help="pairs per mode (default 7)")
    parser.add_argument("--umtt", default=f"{sys.executable} -m pytest_umtt.controller",
                        help="umtt-controller command, with options (split on spaces; "
                             "default: this Python's, so no PATH is needed)")
    args = parser.parse_args()
    if args.kernel is None:
        sys.exit("no kernel: run `umtt-kernel build` or pass --kernel")
    controllers = {"umtt-controller": args.umtt.split()}
    if args.usfstl:
        controllers["usfstl"] = [str(args.usfstl)]
    print(f"{KERNELS} kernels x 1000 wake-ups, {args.runs} interleaved pairs per mode "
          f"(wall seconds, medians)")
    print(f"{'mode':>8} " + " ".join(f"{name:>16}" for name in controllers)
          + "   ratio  (min..max of pairs)")
    for shm in (True, False):
        walls: dict[str, list[float]] = {name: [] for name in controllers}
        for pair in range(args.runs):
            order = list(controllers.items())
            for name, command in order if pair % 2 == 0 else reversed(order):
                walls[name].append(run_once(command, args.kernel, shm))
        print(f"{'shm' if shm else 'messages':>8} "
              + " ".join(f"{statistics.median(walls[name]):>16.3f}" for name in controllers)
              + f"   {_ratios(walls)}", flush=True)


def _ratios(walls: dict[str, list[float]]) -> str:
    if "usfstl" not in walls:
        return "n/a"
    ratios = [ours / theirs for ours, theirs in zip(walls["umtt-controller"],
                                                    walls["usfstl"], strict=True)]
    return f"{statistics.median(ratios):.2f}  ({min(ratios):.2f}..{max(ratios):.2f})"


if __name__ == "__main__":
    main()
