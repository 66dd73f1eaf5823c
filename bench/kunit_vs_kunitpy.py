"""KUnit at kunit.py's scale: every case of a .kunitconfig as a pytest item, against the
kernel's own runner on the same source tree; builds excluded from both.

kunit.py runs in its own build directory (built beforehand with ``kunit.py run``, so
this bench times ``kunit.py exec`` alone: one boot, its parser, its summary). pytest
runs ``--umtt-kconfig="kunit:FILE kunit:ARCH" --umtt-kunit=*`` on pytest-umtt's variant
of the same configs kunit.py merges for UML (FILE, then configs/arch_uml.config; built
beforehand with ``umtt-kernel build --kunitconfig FILE ARCH``): a listing boot while it
collects, one boot that runs every case, one item per case, parameters as subtest
reports. Both name each result as kunit.py does (``suite.case[.param]``); the table
counts them and the names and statuses are compared one by one.

Run: python bench/kunit_vs_kunitpy.py --kunitpy-build-dir /var/tmp/kunit-build
     [--kunitconfig FILE] [--runs N] [--workers 0 2]
(FILE defaults to configs/all_tests.config, the one kunit.py was run with)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pytest_umtt.cache import cache_root
from pytest_umtt.kconfig import KernelConfig
from pytest_umtt.kernel import debian_source, patched_source, shipped_patches, variant_kernel

PCI_WITHOUT_DEVICE = "WARNING: um_pci_init:"
"""The signature of virt-pci's "No virtio device ID configured for PCI" at boot."""
RESULTS_ENV = "UMTT_BENCH_KUNIT_RESULTS"
"""Where this module, loaded into pytest with ``-p``, writes what each item reported."""
STATUS = {"PASS": "passed", "SKIP": "skipped", "FAIL": "failed", "ERROR": "failed"}
"""kunit.py's JSON statuses (tools/testing/kunit/kunit_json.py) as pytest outcomes."""


# --- the pytest side: this module is also the plugin that records results ------------

_reported: list[tuple[str, str]] = []
_parameterised: set[str] = set()
_collected_at: list[float] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the listing boot is over: the run boot's time is measured from here."""
    del session
    _collected_at.append(time.monotonic())


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Each item's outcome, and each subtest report's, by kunit.py's name."""
    case = report.nodeid.rpartition("::")[2]
    context = getattr(report, "context", None)
    if context is not None:
        _reported.append((f"{case}.{context.msg}", report.outcome))
        _parameterised.add(case)
    elif report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _reported.append((case, report.outcome))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Write the results (on the controller only, under xdist)."""
    path = os.environ.get(RESULTS_ENV)
    if path and not hasattr(session.config, "workerinput"):
        # A parameterised case's item stands for its parameters: kunit.py counts those.
        leaves = [result for result in _reported if result[0] not in _parameterised]
        Path(path).write_text(json.dumps({"results": leaves, "collected_at":
                                          _collected_at[0] if _collected_at else None}))


# --- the bench ---------------------------------------------------------------------------

def kunit_tree() -> Path:
    """The patched Debian tree pytest-umtt builds from (and kunit.py runs in)."""
    cache = cache_root()
    return patched_source(debian_source(cache, print), shipped_patches(), cache, print).path


Results = Counter[tuple[str, str]]
"""``(suite.case[.param], outcome)`` pairs, counted: two parameters may share a name."""


def leaves(group: dict[str, Any], path: tuple[str, ...] = ()) -> Results:
    """kunit.py's JSON as results."""
    found = Counter((".".join((*path, case["name"])), STATUS.get(case["status"], "failed"))
                    for case in group.get("test_cases", []))
    for sub in group.get("sub_groups", []):
        found.update(leaves(sub, (*path, sub["name"])))
    return found


def run_kunitpy(tree: Path, build_dir: Path) -> tuple[float, Results]:
    """``kunit.py exec`` (no build): its wall time and its results."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "kunit.json"
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(tree / "tools/testing/kunit/kunit.py"),
                               "exec", "--arch=um", f"--build_dir={build_dir}",
                               f"--json={out}"], capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        wall = time.monotonic() - started
        if not out.is_file():
            sys.exit(f"kunit.py exec failed ({done.returncode}):\n{done.stdout[-2000:]}"
                     f"\n{done.stderr[-2000:]}")
        return wall, leaves(json.loads(out.read_text()))


def run_pytest(variant: KernelConfig, workers: int) -> tuple[float, float, Results]:
    """pytest over every KUnit case of the variant: wall time in all, of which the run
    (after collection), and the results."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "results.json"
        (Path(scratch) / "test_none.py").write_text("")
        command = [sys.executable, "-m", "pytest", "-p", "kunit_vs_kunitpy", "-q",
                   "-p", "no:cacheprovider",
                   f"--umtt-kconfig={variant.to_spec()}",
                   "--umtt-kunit=*", *([f"-n{workers}"] if workers else ["-p", "no:xdist"]),
                   # arch_uml.config turns on PCI over virtio with no device for it, and
                   # the kernel WARNs so at boot (arch/um/drivers/virt-pci.c, um_pci_init);
                   # kunit.py does not judge splats; here it would fail the first case.
                   f"--umtt-allow-splat={PCI_WITHOUT_DEVICE}"]
        env = {**os.environ, RESULTS_ENV: str(out),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                              os.environ.get("PYTHONPATH", "")])}
        started = time.monotonic()
        subprocess.run(command, cwd=scratch, env=env, capture_output=True, check=False)
        wall = time.monotonic() - started
        if not out.is_file():
            sys.exit("pytest wrote no results")
        written = json.loads(out.read_text())
        collected = written["collected_at"]
        run = time.monotonic() - collected if collected and not workers else float("nan")
        return wall, run, Counter((name, outcome) for name, outcome in written["results"])


def differences(ours: Results, theirs: Results) -> list[str]:
    """Each result one side has more often than the other."""
    return [*(f"only pytest: {name} {outcome}" for name, outcome in (ours - theirs).elements()),
            *(f"only kunit.py: {name} {outcome}"
              for name, outcome in (theirs - ours).elements())]


def counts(results: Results) -> str:
    by = [sum(n for (_, o), n in results.items() if o == outcome)
          for outcome in ("passed", "skipped", "failed")]
    return f"{results.total():6} {by[0]:6} {by[1]:7} {by[2]:6}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kunitpy-build-dir", type=Path, required=True)
    parser.add_argument("--kunitconfig", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--without-arch-config", action="store_true",
                        help="pytest's variant without arch_uml.config (its suites that "
                        "need PCI are then missing on pytest's side)")
    parser.add_argument("--kconfig-add", nargs="+", default=[], metavar="CONFIG_X=V",
                        help="options pytest's variant adds (e.g. "
                        "CONFIG_CC_OPTIMIZE_FOR_PERFORMANCE=y, as kunit.py's kernels are)")
    args = parser.parse_args()
    tree = kunit_tree()
    configs = tree / "tools/testing/kunit/configs"
    kunitconfigs = [(args.kunitconfig or configs / "all_tests.config").absolute()]
    if not args.without_arch_config:
        kunitconfigs.append(configs / "arch_uml.config")  # what kunit.py --arch=um merges in
    variant = KernelConfig(kunitconfigs=tuple(kunitconfigs), options=tuple(args.kconfig_add))
    kernel = variant_kernel(variant)
    if not kernel.is_file():
        sys.exit(f"build the variant first: umtt-kernel build --kunitconfig "
                 f"{' '.join(map(str, kunitconfigs))}"
                 + (f" --kconfig-add {' '.join(args.kconfig_add)}" if args.kconfig_add else ""))
    # Interleaved, so that a load that comes and goes falls on every runner alike.
    walls: dict[str, list[float]] = {}
    runs: dict[str, list[float]] = {}
    results: dict[str, Results] = {}
    for _ in range(args.runs):
        wall, results["kunit.py exec"] = run_kunitpy(tree, args.kunitpy_build_dir)
        walls.setdefault("kunit.py exec", []).append(wall)
        for workers in args.workers:
            label = f"pytest -n {workers}" if workers else "pytest"
            wall, run, results[label] = run_pytest(variant, workers)
            walls.setdefault(label, []).append(wall)
            runs.setdefault(label, []).append(run)
    print(f"{'runner':16} {'wall s':>7} {'run s':>6} {'cases':>6} {'passed':>6} "
          f"{'skipped':>7} {'failed':>6}")
    for label, results_of in results.items():
        run_s = f"{statistics.median(runs[label]):6.2f}" if label in runs else " " * 6
        print(f"{label:16} {statistics.median(walls[label]):7.2f} {run_s} {counts(results_of)}")
    for label, results_of in results.items():
        different = differences(results_of, results["kunit.py exec"])
        if label != "kunit.py exec":
            print(f"{label}: names and statuses as kunit.py's: "
                  f"{'all' if not different else f'{len(different)} differ'}")
            for line in different[:80]:
                print(f"    {line}")
    print(f"(median of {args.runs}; builds excluded; kernel {kernel})")


if __name__ == "__main__":
    main()
