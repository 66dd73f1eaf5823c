"""The kernel's own suites as items: KUnit cases and kselftests."""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import time
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from filelock import FileLock

from ..cache import cache_root, writable_dir
from ..errors import KselftestFailure, KunitFailure, UmttError
from ..kernel import kernel_identity
from ..kselftest import (
    GUEST_TREE,
    KnownOutcome,
    KselftestResult,
    KselftestTest,
    Outcome,
    known_outcomes,
    read_tests,
    run_kselftest,
    virtual_budget,
)
from ..ktap import KtapCase, parse_ktap
from ..uml.console import Console, ConsoleLine
from ..uml.splats import Splat
from .settings import CONSOLE_TAIL, Settings
from .splats import judge
from .state import STATE, artifacts_dir, close_simulation, machine_factory, open_simulation


def rerun_alone(item: pytest.Item, suite_option: str) -> str:
    """The command that reruns just ``item`` of a kernel suite, the same way: the suite,
    the item by name, the seed and the kernel."""
    settings = item.config.stash[STATE].settings
    words = ["pytest", suite_option, "-k", item.name, f"--umtt-seed={settings.seed}"]
    if settings.kernel is not None:
        words.append(f"--uml-kernel={settings.kernel}")
    return shlex.join(words)


KUNIT_LISTED = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)$")
"""A case as ``kunit.action=list`` prints it: ``suite.case`` (lib/kunit/executor.c)."""
KUNIT_LISTED_SUITE = re.compile(r"^[A-Za-z0-9_-]+$")
"""A suite as the listing prints it, on its own line before its cases."""
LISTING_OVER = (" as init process", "Freeing unused kernel")
"""What the kernel prints once the listing (in its init, before userspace) is over."""


def listed_cases(text: str) -> list[str]:
    """The cases a listing boot printed, in order, and each suite that has none by its own
    name: the kernel reports an empty suite as one skipped test, and kunit.py counts it."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "KTAP version 1"), None)
    found: list[str] = []
    empty: str | None = None  # the last suite listed, while no case of it has been
    for line in lines[len(lines) if start is None else start + 1:]:
        word = line.strip()
        if any(mark in line for mark in LISTING_OVER):
            break
        if KUNIT_LISTED.match(word):
            empty = None if word.startswith(f"{empty}.") else empty
            found.append(word)
        elif KUNIT_LISTED_SUITE.match(word):
            found += [empty] if empty else []
            empty = word
    return [*found, *([empty] if empty else [])]


class KunitRun(pytest.Collector):
    """The kernel's KUnit suites: one item per test case, as the kernel lists them
    (``kunit.action=list``, one short boot while pytest collects). The cases run when
    their items do: one boot runs every selected case (:class:`KunitCase`)."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        glob = settings.kunit or "*"
        listing = shared_kunit_boot(self.config, settings, glob, action="list")
        boot_error, tail = listing.error, listing.tail
        names = listed_cases(listing.text)
        items: list[pytest.Item] = [KunitCase.from_parent(self, name=name)
                                    for name in dict.fromkeys(names)]
        if boot_error is not None:
            items.append(KunitCase.from_parent(self, name="boot", listing_error=(
                f"the KUnit machine did not come up: {boot_error}")))
        elif not items:
            items.append(KunitCase.from_parent(self, name="no-cases", listing_error=(
                f"no KUnit test case matched {glob!r} (is the suite built in?)\n{tail}")))
        return items


@dataclass(frozen=True, slots=True)
class KunitBoot:
    """What a KUnit machine printed, its splats (each with its header's line index:
    :func:`positioned_splats`), and the error if it did not come up. A boot another xdist
    worker made has no console, only what it recorded (:func:`shared_kunit_boot`)."""

    console: Console | None
    tail: str
    error: UmttError | None
    recorded_text: str = ""
    recorded_lines: tuple[str, ...] = ()
    splats: tuple[tuple[int, Splat], ...] = ()

    @property
    def text(self) -> str:
        """The whole console."""
        return self.console.text if self.console else self.recorded_text

    def timed_lines(self, start: int = 0, stop: int | None = None) -> list[str]:
        """Console lines ``start`` to ``stop``, each with its virtual time."""
        if self.console is not None:
            return [str(line) for line in self.console.lines[start:stop]]
        return list(self.recorded_lines[start:stop])

    def record(self) -> dict[str, object]:
        """What another worker needs to read this boot (JSON)."""
        return {"text": self.text, "lines": self.timed_lines(),
                "tail": self.tail, "error": None if self.error is None else str(self.error),
                "splats": [_splat_record(at, splat) for at, splat in self.splats]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> KunitBoot:
        """A boot as :meth:`record` wrote it."""
        error = record.get("error")
        return cls(None, str(record["tail"]), None if error is None else UmttError(error),
                   str(record["text"]), tuple(record["lines"]),
                   tuple(_splat_from_record(entry) for entry in record.get("splats", [])))


def _splat_record(at: int, splat: Splat) -> dict[str, object]:
    return {"at": at, "kind": splat.kind, "machine": splat.machine,
            "header": next(i for i, line in enumerate(splat.lines) if line is splat.header),
            "lines": [[line.time_ns, line.text] for line in splat.lines],
            "complete": splat.complete, "truncated": splat.truncated}


def _splat_from_record(entry: dict[str, Any]) -> tuple[int, Splat]:
    lines: list[Any] = [ConsoleLine(int(time_ns), str(text)) for time_ns, text in entry["lines"]]
    header = lines[int(entry["header"])]  # a splat knows its header among its lines by identity
    return int(entry["at"]), Splat(str(entry["kind"]), str(entry["machine"]), header, lines,
                                   bool(entry["complete"]), bool(entry["truncated"]))


def shared_kunit_boot(config: pytest.Config, settings: Settings, glob: str,
                      action: str | None = None) -> KunitBoot:
    """:func:`boot_kunit`, once per run: under xdist the first worker to ask boots and
    records what it saw beside the workers' temporary directories, and the others read
    it (the same kernel, seed and glob give the same boot), so ``-n 2`` lists and runs
    the cases once, not once per worker. A listing is also kept across sessions
    (:func:`kept_listing`)."""
    if action == "list":
        return kept_listing(config, settings, glob)
    return _boot_once_per_run(config, settings, glob, action)


def _boot_once_per_run(config: pytest.Config, settings: Settings, glob: str,
                       action: str | None) -> KunitBoot:
    shared = _shared_directory(config)
    if shared is None:
        return boot_kunit(config, settings, glob, action)
    name = hashlib.sha256(f"{settings.kernel}\0{settings.seed}\0{glob}\0{action}".encode())
    return _recorded(shared / f"umtt-kunit-{name.hexdigest()[:16]}.json",
                     lambda: boot_kunit(config, settings, glob, action), keep=lambda _: True)


def kept_listing(config: pytest.Config, settings: Settings, glob: str) -> KunitBoot:
    """The cases a kernel lists for ``glob``: the listing runs nothing, so the same
    binary (and modules) with the same command line lists the same cases; a listing that
    worked is kept in the cache (``kunit-lists/``) and the next session boots no machine
    for it."""
    record = _listing_record(settings, glob)
    boot = functools.partial(_boot_once_per_run, config, settings, glob, "list")
    if record is None:
        return boot()
    return _recorded(record, boot, keep=lambda listing: listing.error is None)


def _recorded(record: Path, boot: Callable[[], KunitBoot],
              keep: Callable[[KunitBoot], bool]) -> KunitBoot:
    """The boot ``record`` holds, else ``boot()``'s, written there (whole, by renaming)
    when ``keep`` says so; one process at a time. A record that cannot be read (none
    yet, damaged, an older format) is booted again and replaced."""
    with FileLock(str(record) + ".lock"):
        try:
            return KunitBoot.from_record(json.loads(record.read_text()))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            pass
        booted = boot()
        if keep(booted):
            staging = record.with_suffix(".tmp")
            staging.write_text(json.dumps(booted.record()))
            staging.replace(record)
        return booted


def _listing_record(settings: Settings, glob: str) -> Path | None:
    if settings.kernel is None:
        return None
    try:
        identity = kernel_identity(settings.kernel)
        folder = writable_dir(cache_root() / "kunit-lists")
    except (OSError, UmttError):
        return None  # no cache to keep it in: list every session
    key = json.dumps([identity.sha256, identity.modules, glob, list(settings.cmdline),
                      settings.mem, LISTING_FORMAT])
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


LISTING_FORMAT = 1
"""Changes when a kept listing's record changes meaning (:meth:`KunitBoot.record`)."""


def _shared_directory(config: pytest.Config) -> Path | None:
    """The directory an xdist run's workers share (their temporary directories' parent,
    as xdist documents for work done once per run); None outside xdist."""
    factory = getattr(config, "_tmp_path_factory", None)
    if not hasattr(config, "workerinput") or factory is None:
        return None
    return Path(factory.getbasetemp()).parent


def boot_kunit(config: pytest.Config, settings: Settings, glob: str,
               action: str | None = None) -> KunitBoot:
    """Boot a machine that runs (or lists) the KUnit cases matching ``glob`` (a case may
    crash it: that is reported, not raised)."""
    started = time.monotonic()
    # KUnit runs its cases in the kernel's init, before userspace: the pinned root would
    # only be unpacked (1.4-1.6 s of CPU per boot) for the agent to say it is up.
    sim = open_simulation(config, settings, host_root=True)
    boot_error: UmttError | None = None
    # Any filter drops the suites that have no case (lib/kunit/executor.c), which the
    # kernel otherwise reports as skipped, as kunit.py, which passes none, counts them.
    cmdline = ["kunit.enable=1", *([f"kunit.filter_glob={glob}"] if glob != "*" else [])]
    if action is not None:
        cmdline.append(f"kunit.action={action}")
    try:
        machine_factory(config, sim, settings)("kunit", cmdline=cmdline)
    except UmttError as exc:
        boot_error = exc
    finally:
        machine = sim.machines.get("kunit")
        console = machine.console if machine else None
        tail = machine.console_tail() if machine else ""
        close_simulation(config, sim, started, None)
    splats = positioned_splats(console) if console is not None else ()
    return KunitBoot(console, tail, boot_error, splats=splats)


KUNIT_RUNS = pytest.StashKey[dict[str, "KunitResults"]]()
KUNIT_GLOB = pytest.StashKey[str]()
"""The glob the session's KUnit boot runs, once its items are known."""


def narrowest_glob(selected: list[str], session_glob: str) -> str:
    """One case, one suite, or else the session's glob: what a boot that runs the
    ``selected`` cases needs."""
    suites = {name.split(".")[0] for name in selected}
    if len(selected) == 1:
        return selected[0]
    if len(suites) == 1:
        return suites.pop()
    return session_glob


@dataclass(frozen=True, slots=True)
class KunitResults:
    """What one boot reported: each case by name (suites and parameterised cases too),
    the subtests of each, and what to say of a case it did not report."""

    glob: str
    cases: dict[str, KtapCase]
    subtests: dict[str, list[KtapCase]]
    boot: KunitBoot | None
    missing: str
    splats: dict[str, list[Splat]] = field(default_factory=dict)
    """The boot's splats, by the leaf case they appeared in (:func:`splats_by_case`)."""

    @classmethod
    def from_boot(cls, glob: str, boot: KunitBoot) -> KunitResults:
        """What ``boot``'s console says of each case."""
        missing = (f"the machine did not come up: {boot.error}" if boot.error is not None else
                   f"the kernel stopped reporting before it (console tail:\n{boot.tail})")
        return cls.from_text(glob, boot.text, boot, missing)

    @classmethod
    def from_text(cls, glob: str, text: str, boot: KunitBoot | None = None,
                  missing: str = "") -> KunitResults:
        """What a KUnit console's ``text`` says of each case."""
        cases = parse_ktap(text, parents=True)
        subtests: dict[str, list[KtapCase]] = {}
        for case in cases:
            subtests.setdefault(case.parent, []).append(case)
        leaves = [case for case in cases if case.name not in subtests]
        splats = splats_by_case(boot.splats if boot else (), leaves)
        return cls(glob, {case.name: case for case in cases}, subtests, boot, missing, splats)

    def splats_of(self, item: str) -> list[Splat]:
        """The splats that fail the item for case ``item``: its own, or its parameters'."""
        names = [item, *(name for name, _ in self.reported(item))]
        return [splat for name in dict.fromkeys(names) for splat in self.splats.get(name, [])]

    def reported(self, item: str) -> list[tuple[str, KtapCase]]:
        """What the item for case ``item`` reports, by full name: its parameters (each a
        subtest report) if it has any, else the case itself."""
        params = self.subtests.get(item)
        if params:
            return [(param.name, param) for param in params]
        case = self.cases.get(item)
        return [(item, case)] if case is not None else []


def splats_by_case(splats: Iterable[tuple[int, Splat]],
                   cases: list[KtapCase]) -> dict[str, list[Splat]]:
    """Each splat of a KUnit boot (with the index of its header among the console's
    ``text.splitlines()``, the numbering of the cases' lines), given to the case during
    which it appeared: the last case whose lines start at or before the header (what a
    suite's exit or the next suite's init prints goes with the case before it), or the
    first case (the boot before any)."""
    ordered = sorted(cases, key=lambda case: case.lines.start)
    found: dict[str, list[Splat]] = {}
    for at, splat in splats:
        if ordered:
            case = next((c for c in reversed(ordered) if c.lines.start <= at), ordered[0])
            found.setdefault(case.name, []).append(splat)
    return found


def positioned_splats(console: Console) -> tuple[tuple[int, Splat], ...]:
    """The console's splats, each with the index of its header among the console's
    ``text.splitlines()`` (a line holding a form feed is two there)."""
    position, index = {}, 0
    for line in console.lines:
        position[id(line)] = index
        index += max(1, len(line.text.splitlines()))
    return tuple((position.get(id(splat.header), 0), splat) for splat in console.splats)


def crash_console(boot: KunitBoot | None, case: KtapCase) -> str:
    """The console from a crashed case on, each line with its virtual time."""
    shown = boot.timed_lines(case.lines.start, case.lines.start + CONSOLE_TAIL) if boot else []
    return "console from the crash on:\n" + "\n".join(shown) if shown else ""


class KunitCase(pytest.Item):
    """One KUnit test case: run when its item runs, with the other selected cases, in one
    boot per glob and xdist worker (``-k`` picks which cases, and so which boot)."""

    def __init__(self, *, listing_error: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.listing_error = listing_error
        self.case: KtapCase | None = None
        self.detail = ""

    def runtest(self) -> None:
        if self.listing_error:
            raise KunitFailure(self.listing_error)
        results = self._results()
        splats = results.splats_of(self.name)
        try:
            self._outcome(results)
        except pytest.skip.Exception:
            judge(self, "call", splats, already_failed=False)  # a splat still fails
            raise
        except Exception:
            judge(self, "call", splats, already_failed=True)
            raise
        judge(self, "call", splats, already_failed=False)

    def _outcome(self, results: KunitResults) -> None:
        self.case = case = results.cases.get(self.name)
        if case is None:
            raise KunitFailure(f"not reported by the boot that ran {results.glob!r}: "
                               f"{results.missing}")
        if case.crashed:
            self.detail = crash_console(results.boot, case)
        for name, param in results.reported(self.name):
            if param is not case:
                queue_subtest_report(self, param, f"KUnit {self.name}",
                                     name.removeprefix(f"{self.name}."))
        if case.skipped:
            pytest.skip(case.reason or "skipped by KUnit")
        if not case.ok:
            raise KunitFailure("\n".join([*case.diagnostics, self.detail]).strip() or "not ok")

    def _results(self) -> KunitResults:
        glob = self._glob()
        runs = self.config.stash.setdefault(KUNIT_RUNS, {})
        if glob not in runs:
            settings = self.config.stash[STATE].settings
            runs[glob] = KunitResults.from_boot(
                glob, shared_kunit_boot(self.config, settings, glob))
        return runs[glob]

    def _glob(self) -> str:
        """The narrowest glob for the cases selected in this session: one case, one
        suite, or the session's own (``--umtt-kunit``); a case outside it still runs.
        Worked out once per session (each case asks: once each would be quadratic)."""
        if KUNIT_GLOB not in self.config.stash:
            selected = [item.name for item in self.session.items if isinstance(item, KunitCase)]
            self.config.stash[KUNIT_GLOB] = narrowest_glob(
                selected, self.config.stash[STATE].settings.kunit or "*")
        return self.config.stash[KUNIT_GLOB]

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, KunitFailure):
            how = "crashed" if self.case is not None and self.case.crashed else "failed"
            text = f"KUnit: {self.name} {how}\n{excinfo.value}"
            return text if self.listing_error else (
                f"{text}\nreproduce: {self._reproduce_command()}")
        return str(super().repr_failure(excinfo, style))

    def _reproduce_command(self) -> str:
        return rerun_alone(self, f"--umtt-kunit={self.name.split('.')[0]}")

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"kunit: {self.name}"


class KselftestRun(pytest.Collector):
    """An installed kselftest tree: one item per test of its list, run when the item runs
    (so ``-k`` selects what boots, and xdist spreads the tests over its workers), each in
    a fresh machine: a crash, a hang or a changed clock cannot touch the next test, and a
    test's run does not depend on which others ran. The KTAP subtests a test prints are
    reported beside it, as results of their own."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        assert settings.kselftest is not None
        known = known_outcomes()
        items: list[pytest.Item] = []
        for test in read_tests(settings.kselftest):
            item = KselftestItem.from_parent(self, name=test.id, test=test,
                                             known=known.get(test.id))
            if item.known is not None and item.known.kind == "xfail":
                # Run; its failure (not a splat) is expected.
                item.add_marker(pytest.mark.xfail(reason=item.known.reason,
                                                  raises=KselftestFailure, strict=False))
            items.append(item)
        return items


class KselftestItem(pytest.Item):
    """One kselftest: it runs in a machine of its own when the item runs."""

    def __init__(self, *, test: KselftestTest, known: KnownOutcome | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test = test
        self.known = known
        """What data/kselftest/known.txt says of it, if anything."""
        self.result: KselftestResult | None = None
        self.splats: list[Splat] = []
        """What the test's kernel reported and survived (a splat fails the test)."""

    def runtest(self) -> None:
        if self.known is not None and self.known.kind == "skip":
            pytest.skip(f"not under UML: {self.known.reason}")
        try:
            self._outcome()
        except pytest.skip.Exception:
            judge(self, "call", self.splats, already_failed=False)  # a splat still fails
            raise
        except Exception:
            judge(self, "call", self.splats, already_failed=True)
            raise
        judge(self, "call", self.splats, already_failed=False)

    def _outcome(self) -> None:
        result = self.result = self._run()
        self.user_properties += [("umtt_virtual_seconds", f"{result.virtual:.9f}"),
                                 ("umtt_wall_seconds", f"{result.wall_seconds:.3f}")]
        for case in result.cases:
            queue_subtest_report(self, case, f"kselftest {self.name}", case.name)
        if result.outcome is Outcome.SKIP:
            pytest.skip(result.detail)
        if result.outcome is not Outcome.PASS:
            raise KselftestFailure(self._failure_text())

    def _run(self) -> KselftestResult:
        settings = self.config.stash[STATE].settings
        root, test = settings.kselftest, self.test
        assert root is not None
        started = time.monotonic()
        sim = open_simulation(self.config, settings, coverage_for=self.nodeid)
        try:
            machine = machine_factory(self.config, sim, settings)("kselftest")
            return run_kselftest(machine, test, tree=machine.push(root, GUEST_TREE),
                                 timeout=virtual_budget(root, test, settings.kselftest_timeout),
                                 wall_timeout=settings.kselftest_wall_timeout)
        except UmttError as exc:  # the machine did not come up: report it, run the rest
            return KselftestResult(test, Outcome.CRASH, f"the machine did not come up: {exc}",
                                   wall_seconds=time.monotonic() - started)
        finally:
            close_simulation(self.config, sim, started,
                             artifacts_dir(settings, f"kselftest/{test.id}"))
            # Its machine opened and closed within this call: the splat watcher never
            # saw it, so its splats are judged here.
            self.splats = [splat for machine in sim.machines.values()
                           for splat in machine.splats]

    def _failure_text(self) -> str:
        result = self.result
        assert result is not None
        lines = result.output.splitlines()[-CONSOLE_TAIL:]
        return (f"{result.outcome.value}: {result.detail}\n"
                f"({result.virtual:.3f} s virtual, {result.wall_seconds:.1f} s wall)\n"
                f"reproduce: {self._reproduce_command()}"
                + (f"\n--- output (last {len(lines)} lines) ---\n" + "\n".join(lines)
                   if lines else "\n(no output)"))

    def _reproduce_command(self) -> str:
        return rerun_alone(self, f"--umtt-kselftest={self.config.stash[STATE].settings.kselftest}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, KselftestFailure):
            return f"kselftest {self.name}: {excinfo.value}"
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"kselftest: {self.name}"


def queue_subtest_report(item: pytest.Item, case: KtapCase, label: str, name: str) -> None:
    """A KTAP subtest's result (a kselftest's subtest, a KUnit case's parameter) as a
    report of its own, ``name`` in its context: they are known only once the item ran,
    too late to be collected as items. Logged once the item's own reports are
    (:func:`pytest_runtest_protocol`), outside its capture."""
    longrepr: Any = None
    outcome: Literal["passed", "failed", "skipped"] = "passed"
    if case.skipped:
        outcome = "skipped"
        longrepr = (str(item.path), 0, f"Skipped: {case.reason or 'skipped (KTAP)'}")
    elif not case.ok:
        outcome = "failed"
        longrepr = f"{label}/{name}: " + ("\n".join(case.diagnostics) or "not ok")
    # pytest's subtest reports: the item's own node id (xdist requires it), the
    # subtest's name as their context; shown as SUBPASSED[name] and counted apart.
    report = pytest.SubtestReport(
        nodeid=item.nodeid, location=item.location, keywords={}, outcome=outcome,
        longrepr=longrepr, when="call", user_properties=[("umtt_ktap_subtest", name)])
    report.context = KtapContext(msg=name)  # type: ignore[assignment]
    item.config.stash.setdefault(SUBTEST_REPORTS, {}).setdefault(item.nodeid, []).append(report)


@dataclass(frozen=True, slots=True)
class KtapContext:
    """What a subtest report says of its subtest (the fields of pytest's own context)."""

    msg: str
    kwargs: dict[str, str] = field(default_factory=dict)

    def _to_json(self) -> dict[str, object]:
        return {"msg": self.msg, "kwargs": self.kwargs}


SUBTEST_REPORTS = pytest.StashKey[dict[str, list[pytest.SubtestReport]]]()
"""KTAP subtest reports of the kselftests that ran, waiting to be logged, by test node id."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[
        None, object, object]:
    """Log a kselftest's KTAP subtests right after the test's own reports."""
    del nextitem
    result = yield
    for report in item.config.stash.get(SUBTEST_REPORTS, {}).pop(item.nodeid, []):
        item.ihook.pytest_runtest_logreport(report=report)
    return result
