"""A kselftest tree under pytest-umtt, without pytest: each test's outcome, virtual and
wall time; one machine per test or one per tree (a fresh one after a stopped test).

Run: python bench/kselftest.py TREE [--wall SECONDS] [--per test|tree] [--only ID...]
     [--kconfig SPEC]   (a kernel variant as --umtt-kconfig names it, built beforehand)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt import Machine, Simulation
from pytest_umtt.kconfig import parse_spec
from pytest_umtt.kernel import variant_kernel
from pytest_umtt.kselftest import (
    GUEST_TREE,
    KselftestResult,
    KselftestTest,
    read_tests,
    run_kselftest,
    virtual_budget,
)
from pytest_umtt.rootfs import build_rootfs


def booted(sim: Simulation, tree: Path, name: str, cmdline: list[str]) -> Machine:
    machine = sim.machine(name, cmdline=cmdline)
    machine.push(tree, GUEST_TREE)
    return machine


def show(result: KselftestResult, boot: float) -> None:
    print(f"{result.test.id:28} {result.outcome.value:8} {result.virtual:10.3f} s "
          f"virtual {result.wall_seconds:7.2f} s wall  boot {boot:.2f} s  "
          f"{len(result.cases)} cases  {result.detail[:150]}", flush=True)


def per_test(tree: Path, tests: list[KselftestTest], wall: float,
             cmdline: list[str], kernel: Path | None) -> list[KselftestResult]:
    results = []
    rootfs = build_rootfs()
    for test in tests:
        with Simulation(kernel=kernel, rootfs=rootfs, seed=0) as sim:
            started = time.monotonic()
            machine = booted(sim, tree, "ks", cmdline)
            boot = time.monotonic() - started
            results.append(run_kselftest(machine, test, tree=f"/mnt/{GUEST_TREE}",
                                         timeout=virtual_budget(tree, test, None),
                                         wall_timeout=wall))
            show(results[-1], boot)
    return results


def per_tree(tree: Path, tests: list[KselftestTest], wall: float,
             cmdline: list[str], kernel: Path | None) -> list[KselftestResult]:
    results = []
    with Simulation(kernel=kernel, rootfs=build_rootfs(), seed=0) as sim:
        machine: Machine | None = None
        for test in tests:
            boot = 0.0
            if machine is None:
                started = time.monotonic()
                machine = booted(sim, tree, f"ks{len(sim.machines) + 1}", cmdline)
                boot = time.monotonic() - started
            results.append(run_kselftest(machine, test, tree=f"/mnt/{GUEST_TREE}",
                                         timeout=virtual_budget(tree, test, None),
                                         wall_timeout=wall))
            show(results[-1], boot)
            if not results[-1].machine_usable:
                machine.close(polite=False)
                machine = None
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("tree", type=Path)
    parser.add_argument("--wall", type=float, default=20.0)
    parser.add_argument("--per", choices=("test", "tree"), default="test")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--cmdline", nargs="*", default=[])
    parser.add_argument("--kconfig", help="a kernel variant, as --umtt-kconfig names it")
    args = parser.parse_args()
    kernel = variant_kernel(parse_spec(args.kconfig, "--kconfig")) if args.kconfig else None
    if kernel is not None and not kernel.is_file():
        sys.exit(f"no kernel for {args.kconfig!r}: build it with umtt-kernel build")
    tests = [t for t in read_tests(args.tree) if not args.only or t.id in args.only]
    started = time.monotonic()
    run = per_test if args.per == "test" else per_tree
    results = run(args.tree, tests, args.wall, args.cmdline, kernel)
    total = time.monotonic() - started
    virtual = sum(r.virtual for r in results)
    counts: dict[str, int] = {}
    for result in results:
        counts[result.outcome.value] = counts.get(result.outcome.value, 0) + 1
    print(f"{len(results)} tests {counts}: {virtual:.1f} s virtual, {total:.1f} s wall in all, "
          f"{sum(r.wall_seconds for r in results):.1f} s wall in tests")


if __name__ == "__main__":
    main()
