"""What a device's work costs on the host, without a kernel: a well-behaved frontend
(tests/hostile_frontend.py) kicks a console's transmit queue with 64 bytes, or asks the
rng for 64 bytes (a kick, the answer a latency later, its interrupt answered), and the
wall time per round trip is measured, the frontend's share included.

``--tree DIR`` measures another checkout of pytest-umtt (an older commit, say) with the
same frontend, for an A/B of a change to the device layer.

Run: python bench/device_kicks.py [--rounds 5] [--tree DIR]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", type=Path, default=HERE)
    args = parser.parse_args()
    frontend = load(args.tree.resolve())
    console, rng = [], []
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(args.rounds):
            console.append(console_kicks(frontend, Path(directory)))
            rng.append(rng_requests(frontend, Path(directory)))
    print(f"tree: {args.tree}")
    print("| what | median per round trip | min..max |")
    print("|---|---|---|")
    for name, values in (("console kick, 64 bytes", console), ("rng request, 64 bytes", rng)):
        print(f"| {name} | {statistics.median(values) * 1e6:.1f} us | "
              f"{min(values) * 1e6:.1f}..{max(values) * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
