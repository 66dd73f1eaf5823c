"""What a device's work costs on the host, without a kernel: a well-behaved frontend
(tests/hostile_frontend.py) kicks a console's transmit queue with 64 bytes, or asks the
rng for 64 bytes (a kick, the answer a latency later, its interrupt answered), and the
wall time per round trip is measured, the frontend's share included.

``--tree DIR`` measures another checkout of pytest-umtt (an older commit, say) with the
same frontend, for an A/B of a change to the device layer. ``--mapped`` measures this
checkout twice, rounds interleaved: as it is (guest memory through the file descriptor)
and with guest memory accessed through a mapping instead, as before docs/DESIGN.md
fact 26 (for the measurement only: a mapping is what a shrunk file turns into a SIGBUS).

Run: python bench/device_kicks.py [--rounds 5] [--tree DIR | --mapped]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent.parent
KICKS = 2000


def load(tree: Path) -> ModuleType:
    """pytest-umtt from ``tree``, and the frontend (from this checkout) on top of it."""
    sys.path.insert(0, str(tree))
    spec = importlib.util.spec_from_file_location("hostile_frontend",
                                                  HERE / "tests" / "hostile_frontend.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def console_kicks(frontend: ModuleType, directory: Path) -> float:
    """Wall seconds per transmit kick of 64 bytes, acknowledged."""
    console = importlib.import_module("pytest_umtt.devices.console")  # from --tree
    served = frontend.Served(console.VirtioConsole(), directory)
    served.frontend.handshake(served.ram)
    ring = served.ring(1, 256)
    ring.descriptor(0, ring.buffers, 64)
    served.ram.write(ring.buffers, b"x" * 64)
    started = time.perf_counter()
    for _ in range(KICKS):
        ring.offer(0)
        served.frontend.kick(1)
        served.frontend.drain()
    took = (time.perf_counter() - started) / KICKS
    assert len(served.device.received) == 64 * KICKS
    served.close()
    return took


def rng_requests(frontend: ModuleType, directory: Path) -> float:
    """Wall seconds per 64-byte rng request: kick, answer, interrupt and its reply."""
    devices = importlib.import_module("pytest_umtt.devices")  # from --tree
    served = frontend.Served(devices.VirtioRng(), directory)
    served.frontend.handshake(served.ram)
    ring = served.ring(0, 256)
    ring.descriptor(0, ring.buffers, 64, 2)
    started = time.perf_counter()
    for _ in range(KICKS):
        ring.offer(0)
        served.frontend.kick(0)
        served.frontend.drain()
    took = (time.perf_counter() - started) / KICKS
    assert served.device.bytes_served == 64 * KICKS
    served.close()
    return took


def measure(frontend: ModuleType, rounds: int, variants: dict[str, dict[str, object]]
            ) -> dict[str, tuple[list[float], list[float]]]:
    """Per variant (accessors to install; none: as it is), console and rng times."""
    memory = importlib.import_module("pytest_umtt.devices.guest_memory").GuestMemory
    results: dict[str, tuple[list[float], list[float]]] = {v: ([], []) for v in variants}
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(rounds):
            for name, accessors in variants.items():
                for attribute, function in accessors.items():
                    setattr(memory, attribute, function)
                results[name][0].append(console_kicks(frontend, Path(directory)))
                results[name][1].append(rng_requests(frontend, Path(directory)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=HERE)
    parser.add_argument("--mapped", action="store_true")
    args = parser.parse_args()
    frontend = load(args.tree.resolve())
    variants: dict[str, dict[str, object]] = {str(args.tree): {}}
    if args.mapped:
        through_fd, mapped = frontend.mapped_access()
        variants = {"through the descriptor": through_fd, "through a mapping": mapped}
    results = measure(frontend, args.rounds, variants)
    print(f"| what | {' | '.join(variants)} |")
    print("|---|" + "---|" * len(variants))
    for row, name in enumerate(("console kick, 64 bytes", "rng request, 64 bytes")):
        cells = [f"{statistics.median(times[row]) * 1e6:.1f} us "
                 f"({min(times[row]) * 1e6:.0f}..{max(times[row]) * 1e6:.0f})"
                 for times in results.values()]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
