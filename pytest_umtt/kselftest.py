"""Kernel selftests (kselftests) in virtual time: build, list and run them in UML machines.

An installed kselftest tree (``make -C tools/testing/selftests TARGETS=... install
INSTALL_PATH=DIR``) holds ``kselftest-list.txt`` (``collection:test`` lines), one
directory per collection, and optionally a ``settings`` file per collection whose
``timeout=`` replaces kselftest's default of 45 s (0: no limit).

:func:`run_kselftest` runs one test in a booted machine under two budgets: virtual time
(kselftest's timeout, enforced by the guest at the exact virtual instant) and wall time.
The wall budget matters because of UML's physics (DESIGN.md fact 14): virtual time moves
only when the guest reads the clock (256 ns per read, about 45 us of wall time each), so a
test that polls the clock runs 100-180x slower than real time, and one that spins in pure
userspace stops virtual time altogether. The result says which of these happened.

Works without pytest; the plugin turns results into items.
"""

from __future__ import annotations

import argparse
import enum
import hashlib
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from filelock import FileLock

from .cache import cache_root, run_step, staging_beside, writable_dir
from .errors import (
    NS_PER_S,
    KselftestError,
    MachineCrashed,
    MachineError,
    MachineStalled,
    format_ns,
)
from .kconfig import KernelConfig
from .kernel import build_kernel, debian_source, user_source
from .ktap import KtapCase, parse_ktap
from .uml.machine import BackgroundCommand, Machine
from .units import seconds_to_ns

LIST_FILE = "kselftest-list.txt"
SETTINGS_FILE = "settings"
DEFAULT_TIMEOUT = 45.0
"""kselftest's own per-test timeout (kselftest/runner.sh), in seconds."""
DEFAULT_WALL_TIMEOUT = 60.0
"""Wall seconds a test may take under UML before it is stopped and diagnosed."""
SKIP_STATUS = 4
"""A kselftest's exit status for "skipped" (KSFT_SKIP)."""
TIMEOUT_STATUSES = (124, 137)
"""What ``timeout -s KILL`` leaves when it kills a command at its budget."""
GUEST_TREE = "kselftest"
"""The name of the installed tree in a machine's directory (``/mnt/kselftest``)."""
CLOCK_READ_NS = 256
"""How far a clock read in a busy guest moves UML's virtual time (arch/um/kernel/time.c)."""
OUTPUT_TAIL = 40
LINE_BUFFERED = "stdbuf -oL -eL"
"""coreutils' stdbuf: stdio output as on a terminal, not held in a 4 KiB buffer."""
RECIPE_VERSION = "2"


# --- the installed tree ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KselftestTest:
    """One test of an installed tree: ``collection:name`` in kselftest-list.txt."""

    collection: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.collection}:{self.name}"


def read_tests(root: Path) -> list[KselftestTest]:
    """The tests that ``root``'s kselftest-list.txt names, in its order."""
    listing = root / LIST_FILE
    try:
        lines = listing.read_text().splitlines()
    except OSError as exc:
        raise KselftestError(f"{root} is not an installed kselftest tree: cannot read "
                             f"{LIST_FILE} ({exc.strerror}); install one with `make -C "
                             f"tools/testing/selftests TARGETS=... install INSTALL_PATH=DIR`"
                             ) from None
    tests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        collection, sep, name = line.strip().partition(":")
        if not sep or not collection or not name or ".." in Path(collection).parts:
            raise KselftestError(f"{listing}:{number}: expected collection:test, got {line!r}")
        tests.append(KselftestTest(collection, name))
    return tests


def collection_timeout(root: Path, collection: str) -> float | None:
    """The ``timeout=`` of a collection's settings file: seconds, 0 for "no limit",
    None when the file does not set one."""
    try:
        lines = (root / collection / SETTINGS_FILE).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition("=")
        if key.strip() == "timeout":
            try:
                return max(0.0, float(value))
            except ValueError:
                raise KselftestError(f"{root / collection / SETTINGS_FILE}: timeout is not a "
                                     f"number: {value!r}") from None
    return None


def virtual_budget(root: Path, test: KselftestTest, override: float | None) -> float | None:
    """The virtual seconds ``test`` may take, as run_kselftest.sh decides them: an
    override first, else the collection's settings, else 45 s; None is "no limit"."""
    if override is not None:
        return override
    configured = collection_timeout(root, test.collection)
    if configured is None:
        return DEFAULT_TIMEOUT
    return configured or None


KNOWN_FILE = "data/kselftest/known.txt"
KNOWN_KINDS = ("skip", "xfail")


@dataclass(frozen=True, slots=True)
class KnownOutcome:
    """What pytest-umtt knows of a kselftest beforehand (data/kselftest/known.txt): it
    cannot work under UML (``skip``: not run), or it fails on any kernel (``xfail``: run,
    its failure expected)."""

    kind: str
    reason: str


def known_outcomes(text: str | None = None) -> dict[str, KnownOutcome]:
    """``{"collection:test": KnownOutcome}`` from the shipped list (or ``text``): lines of
    ``collection:test KIND reason``, ``#`` comments."""
    if text is None:
        text = resources.files("pytest_umtt").joinpath(KNOWN_FILE).read_text()
    known = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        test, kind, reason = ([*line.split(None, 2), "", ""])[:3]
        if ":" not in test or kind not in KNOWN_KINDS or not reason:
            raise KselftestError(f"{KNOWN_FILE}:{number}: expected 'collection:test "
                                 f"{'|'.join(KNOWN_KINDS)} reason', got {line!r}")
        known[test] = KnownOutcome(kind, reason.strip())
    return known


# --- running one test -------------------------------------------------------------------

class Outcome(enum.Enum):
    """How a kselftest ended."""

    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"
    TIMEOUT = "timeout"  # its virtual budget ran out: the guest killed it
    SLOW = "slow"  # the wall budget ran out while virtual time crawled (clock polling)
    STALL = "stall"  # virtual time stood still (a busy loop)
    CRASH = "crash"  # the kernel crashed


@dataclass(frozen=True, slots=True)
class KselftestResult:
    """What one test did, with the virtual and wall time it took."""

    test: KselftestTest
    outcome: Outcome
    detail: str
    output: str = ""
    status: int | None = None
    virtual_ns: int = 0
    wall_seconds: float = 0.0
    cases: tuple[KtapCase, ...] = field(default=())

    @property
    def virtual(self) -> float:
        """Virtual seconds the test took (``virtual_ns`` is exact)."""
        return self.virtual_ns / NS_PER_S

    @property
    def ok(self) -> bool:
        return self.outcome in (Outcome.PASS, Outcome.SKIP)

    @property
    def machine_usable(self) -> bool:
        """Whether the machine can run another test (the test ended by itself)."""
        return self.outcome in (Outcome.PASS, Outcome.FAIL, Outcome.SKIP, Outcome.TIMEOUT)


def guest_command(test: KselftestTest, tree: str) -> str:
    """The guest command that runs ``test`` from the tree at ``tree``, as runner.sh
    does: in its collection's directory, stderr with stdout; its output line-buffered,
    so a test that has to be stopped has shown how far it got."""
    return (f"cd {shlex.quote(f'{tree}/{test.collection}')} && "
            f"exec {LINE_BUFFERED} ./{shlex.quote(test.name)} 2>&1")


def run_kselftest(machine: Machine, test: KselftestTest, *, tree: str,
                  timeout: float | None, wall_timeout: float) -> KselftestResult:
    """Run ``test`` (installed at ``tree`` in the guest) in ``machine``: at most
    ``timeout`` virtual seconds (None: the machine's default) and ``wall_timeout`` wall
    seconds. A result that is not ``machine_usable`` leaves the machine stopped."""
    budget = machine.default_timeout if timeout is None else timeout
    stall = min(machine.sim.wall_timeout, wall_timeout)
    began = time.monotonic()
    job = machine.start(guest_command(test, tree), timeout=budget)
    try:
        # The kernel yields every console-resolution step, so the wall budget is checked
        # often, and a stall is called within the wall budget.
        with machine.sim.watched_closely(wall_timeout=stall):
            give_up = began + wall_timeout
            machine.sim.run_until(lambda: job.done or time.monotonic() > give_up,
                                  deadline_ns=job.started_ns + seconds_to_ns(budget) + NS_PER_S,
                                  machines=(machine,))
    except MachineStalled as exc:
        return _stalled(test, job, exc, stall, time.monotonic() - began)
    except MachineCrashed as exc:
        return KselftestResult(test, Outcome.CRASH, f"the kernel crashed: {exc.what}",
                               exc.console_tail, None, exc.now_ns - job.started_ns,
                               time.monotonic() - began)
    wall = time.monotonic() - began
    if not job.done:
        return _stopped(test, job, budget, wall, wall_timeout)
    return _finished(test, job, budget, wall)


def _finished(test: KselftestTest, job: BackgroundCommand, budget: float,
              wall: float) -> KselftestResult:
    result = job.wait()
    output = result.output
    took = result.ended_ns - result.started_ns
    base = KselftestResult(test, Outcome.PASS, "exit status 0", output, result.status,
                           took, wall, tuple(parse_ktap(output)))
    if result.status in TIMEOUT_STATUSES and took >= seconds_to_ns(budget):
        return replace(base, outcome=Outcome.TIMEOUT, detail=(
            f"killed at its budget of {budget:g} s of virtual time (kselftest's timeout), "
            f"after {wall:.1f} s of wall time"))
    if result.status == SKIP_STATUS:
        return replace(base, outcome=Outcome.SKIP, detail=_skip_reason(output, base.cases))
    if result.status != 0:
        return replace(base, outcome=Outcome.FAIL, detail=f"exit status {result.status}")
    return base


def _skip_reason(output: str, cases: Sequence[KtapCase]) -> str:
    reasons = [case.reason for case in cases if case.skipped and case.reason]
    if reasons:
        return reasons[-1]
    lines = [line.strip("# ").strip() for line in output.splitlines() if line.strip("# ")]
    return f"exit status 4 (skip): {lines[-1]}" if lines else "exit status 4 (skip)"


def _stopped(test: KselftestTest, job: BackgroundCommand, budget: float, wall: float,
             wall_timeout: float) -> KselftestResult:
    """The wall budget ran out while virtual time still moved: a clock-polling loop."""
    machine = job.machine
    moved = machine.sim.now_ns - job.started_ns
    detail = slow_diagnosis(moved, wall, budget)
    if wall < wall_timeout:  # the virtual backstop, not the wall budget
        detail = f"did not end at its virtual budget of {budget:g} s"
    machine.crashed(f"stopped: the kselftest {test.id} {detail}")
    return KselftestResult(test, Outcome.SLOW, detail, _output_so_far(machine, job), None,
                           moved, wall)


def slow_diagnosis(virtual_ns: int, wall: float, budget: float) -> str:
    """What it means that ``virtual_ns`` of virtual time passed in ``wall`` seconds."""
    rate = virtual_ns / NS_PER_S / wall if wall > 0 else 0.0
    text = (f"virtual time advanced {virtual_ns / NS_PER_S:.3f} s in {wall:.1f} s of wall time: "
            f"a loop that polls the clock")
    if 0 < rate < 1:
        text += f", running {1 / rate:.{0 if rate < 0.1 else 1}f}x slower than real time"
        if budget / rate < 86400:
            text += (f" (its budget of {budget:g} virtual s would take "
                     f"{budget / rate / 60:.0f} min of wall time)")
    return (text + f". Under UML each clock read advances virtual time by {CLOCK_READ_NS} ns "
            f"(TIMER_MULTIPLIER) and costs tens of microseconds of wall time")


def _stalled(test: KselftestTest, job: BackgroundCommand, exc: MachineStalled,
             stall: float, wall: float) -> KselftestResult:
    moved = exc.now_ns - job.started_ns
    detail = (f"virtual time stood still at {format_ns(exc.now_ns)} (the test had run "
              f"{moved / NS_PER_S:.3f} virtual s) for {stall:.1f} s "
              f"of wall time: a busy loop that never reads the clock or sleeps, which stops "
              f"UML's virtual time")
    return KselftestResult(test, Outcome.STALL, detail, _output_so_far(job.machine, job),
                           None, moved, wall)


def _output_so_far(machine: Machine, job: BackgroundCommand) -> str:
    """What a stopped test had printed (the guest wrote it to the command's file)."""
    try:
        return machine.channel.read(job.number, "stdout").decode(errors="replace")
    except (OSError, MachineError):
        return ""


# --- building a tree --------------------------------------------------------------------

def kselftest_cache() -> Path:
    """Where built kselftest trees are kept."""
    return cache_root() / "kselftest"


def build_kselftests(targets: Sequence[str], *, source: Path | None = None,
                     destructive: bool = False, force: bool = False,
                     say: Callable[[str], None] = lambda _: None) -> Path:
    """Build and install the kselftests of ``targets`` (cached); the installed tree.
    With ``destructive`` a target's DESTRUCTIVE_TESTS (timers: tests that set the clock
    or need privileges) join kselftest-list.txt: harmless in a throwaway UML machine."""
    cache = writable_dir(kselftest_cache())
    tree = user_source(source) if source else debian_source(cache_root(), say)
    key = hashlib.sha256("\n".join([RECIPE_VERSION, tree.identity, *sorted(targets),
                                    str(destructive)]).encode()).hexdigest()[:16]
    final = cache / key
    with FileLock(str(final) + ".lock"):
        if (final / LIST_FILE).is_file() and not force:
            return final
        with staging_beside(final) as staging:
            _install(tree.path / "tools" / "testing" / "selftests", targets, staging, say)
            _add_includes(tree.path / "tools" / "testing" / "selftests", targets,
                          staging / "install")
            if destructive:
                _list_destructive(tree.path / "tools" / "testing" / "selftests", targets,
                                  staging / "install")
            shutil.rmtree(final, ignore_errors=True)
            (staging / "install").rename(final)
    return final


def _install(selftests: Path, targets: Sequence[str], staging: Path,
             say: Callable[[str], None]) -> None:
    missing = [tool for tool in ("make", "gcc", "rsync") if shutil.which(tool) is None]
    if missing:
        raise KselftestError(f"building kselftests needs {', '.join(missing)} "
                             f"(apt-get install {' '.join(missing)})")
    say(f"building kselftests {' '.join(targets)} from {selftests}")
    command = ["make", "-s", "-C", str(selftests), f"TARGETS={' '.join(targets)}",
               f"O={staging / 'build'}", "install", f"INSTALL_PATH={staging / 'install'}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (staging / "install" / LIST_FILE).is_file():
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-OUTPUT_TAIL:])
        raise KselftestError(f"{shlex.join(command)} failed ({done.returncode}):\n{tail}")


def missing_includes(target: str) -> list[str]:
    """Files (relative to tools/testing/selftests) that ``target``'s scripts source but its
    Makefile does not install (``data/kselftest/TARGET.includes``, ``/`` spelled ``-``):
    installed, they would fail to start."""
    name = f"data/kselftest/{target.replace('/', '-')}.includes"
    found = resources.files("pytest_umtt").joinpath(name)
    if not found.is_file():
        return []
    return [line.strip() for line in found.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _add_includes(selftests: Path, targets: Sequence[str], install: Path) -> None:
    for target in targets:
        for relative in missing_includes(target):
            (install / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(selftests / relative, install / relative)


def _list_destructive(selftests: Path, targets: Sequence[str], install: Path) -> None:
    lines = []
    for target in targets:
        printed = subprocess.run(
            ["make", "-s", "-C", str(selftests / target),
             "--eval=umtt-destructive: ; @echo $(DESTRUCTIVE_TESTS)", "umtt-destructive"],
            capture_output=True, text=True, check=False)
        lines += [f"{target}:{name}" for name in printed.stdout.split()
                  if (install / target / name).is_file()]
    with (install / LIST_FILE).open("a") as listing:
        listing.writelines(f"{line}\n" for line in lines)


# --- command line -----------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``umtt-kselftest``."""
    parser = argparse.ArgumentParser(prog="umtt-kselftest",
                                     description="Build kselftests for pytest-umtt.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build and install kselftests (cached); "
                                "print the installed tree's path")
    build.add_argument("--targets", required=True, nargs="+", metavar="TARGET",
                       help="selftest directories, e.g. timers")
    build.add_argument("--source", metavar="DIR", help="Linux tree (default: Debian's "
                       "linux-source-6.12, as umtt-kernel uses)")
    build.add_argument("--destructive", action="store_true", help="list the targets' "
                       "DESTRUCTIVE_TESTS too (they set the clock; fine in a UML machine)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--kernel", action="store_true", help="build the kernel variant the "
                       "targets' config files ask for too (umtt-kernel build "
                       "--kselftest-config TARGET...)")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        print(f"umtt-kselftest: {text}", file=sys.stderr, flush=True)

    def step() -> int:
        source = Path(args.source) if args.source else None
        path = build_kselftests(args.targets, source=source, destructive=args.destructive,
                                force=args.force, say=say)
        config = KernelConfig(kselftest_targets=tuple(args.targets))
        if args.kernel:
            tree = user_source(source) if source else debian_source(cache_root(), say)
            build_kernel(tree, say=say, config=config)
        say(f"run them: pytest --umtt-kselftest={path} "
            f"--umtt-kconfig={shlex.quote(config.to_spec())}")
        print(path)
        return 0

    return run_step("umtt-kselftest", "build", step, say)


if __name__ == "__main__":
    sys.exit(main())
