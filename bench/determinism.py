"""Same seed, same run, measured on the example suite:

1. the suite N times with one seed: are all traces, consoles and command records identical?
2. the timing-dependent example across seeds: which seeds fail, and does each seed give
   its outcome every time?
3. what --umtt-check-determinism costs in wall time;
4. the canary (python -m pytest_umtt.canary) under host variations that must not matter,
   and against its golden digest;
5. whether rebuilding the kernel gives the same binary (``umtt-kernel build --force``
   twice; skipped with --no-rebuild).

Run: python bench/determinism.py [--runs 10] [--seeds 10] [--no-rebuild]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt.canary import host_variations, run_in_child
from pytest_umtt.kernel import default_kernel, kernel_identity

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "canary.json"
FLAKY = "example_suite/test_flaky_race.py"


def pytest(*args: str) -> tuple[int, float]:
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, check=False).returncode
    return code, time.perf_counter() - started


def digest(directory: Path) -> str:
    """One hash over every artifact file (name and bytes), console logs included."""
    total = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            total.update(str(path.relative_to(directory)).encode())
            total.update(path.read_bytes())
    return total.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--no-rebuild", action="store_true")
    args = parser.parse_args()
    kernel = default_kernel()
    assert kernel is not None, "build the kernel first: umtt-kernel build"

    with tempfile.TemporaryDirectory() as tmp:
        digests = []
        for run in range(args.runs):
            artifacts = Path(tmp) / f"run{run}"
            pytest("example_suite", "--umtt-seed=0", f"--umtt-artifacts={artifacts}")
            digests.append(digest(artifacts))
    print(f"1. example_suite x{args.runs}, seed 0: {len(set(digests))} distinct artifact "
          f"digest(s) {sorted(set(digests))}")

    print(f"2. {FLAKY}, {args.runs} runs per seed:")
    print(f"   {'seed':>4} {'failed':>7}  outcome")
    for seed in range(args.seeds):
        failures = sum(pytest(FLAKY, f"--umtt-seed={seed}")[0] != 0 for _ in range(args.runs))
        outcome = ("fails every time" if failures == args.runs else
                   "passes every time" if failures == 0 else "MIXED")
        print(f"   {seed:>4} {failures:>4}/{args.runs}  {outcome}")

    plain = min(pytest("example_suite")[1] for _ in range(3))
    checked = min(pytest("example_suite", "--umtt-check-determinism")[1] for _ in range(3))
    print(f"3. example_suite wall: {plain:.1f} s plain, {checked:.1f} s with "
          f"--umtt-check-determinism ({checked / plain:.2f}x; best of 3)")
    canary_under_variations(kernel)
    if not args.no_rebuild:
        rebuilds(kernel)


def canary_under_variations(kernel: Path) -> None:
    print("4. canary, seed 0, under host variations:")
    with tempfile.TemporaryDirectory() as tmp:
        results = {name: run_in_child(v.kernel, v.prefix, v.env)
                   for name, v in host_variations(kernel, Path(tmp)).items()}
    for name, result in results.items():
        print(f"   {name:<24} {result.digest[:16]}  ({result.items} items)")
    first = next(iter(results.values()))
    golden = json.loads(GOLDEN.read_text())["digests"].get(first.key, {}).get("seed 0")
    verdict = ("no golden for this kernel/root" if golden is None else
               "matches the golden digest" if golden == first.digest else "DIFFERS from golden")
    print(f"   {len({r.digest for r in results.values()})} distinct digest(s); key {first.key}: "
          f"{verdict}")


def rebuilds(kernel: Path) -> None:
    print("5. umtt-kernel build --force, twice:")
    shas = [kernel_identity(kernel).sha256[:16]]
    for attempt in (1, 2):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest_umtt.kernel", "build", "--force"],
                       cwd=ROOT, capture_output=True, check=True)
        shas.append(hashlib.sha256(kernel.read_bytes()).hexdigest()[:16])
        print(f"   rebuild {attempt}: {time.perf_counter() - started:.0f} s, "
              f"sha256 {shas[-1]}")
    print(f"   before: {shas[0]}; {len(set(shas))} distinct sha256")


if __name__ == "__main__":
    main()
