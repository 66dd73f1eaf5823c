"""The kernel's own suites as items: KUnit cases and kselftests."""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from ..errors import UmttError
from ..kselftest import (
    GUEST_TREE,
    KselftestResult,
    KselftestTest,
    Outcome,
    read_tests,
    run_kselftest,
    virtual_budget,
)
from ..ktap import KtapCase, parse_ktap
from ..uml.console import Console
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


class KunitFailure(Exception):
    """A KUnit case reported ``not ok``."""


KUNIT_LISTED = re.compile(r"^([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)$")
"""A case as ``kunit.action=list`` prints it: ``suite.case`` (lib/kunit/executor.c)."""


class KunitRun(pytest.Collector):
    """The kernel's KUnit suites: one item per test case, as the kernel lists them
    (``kunit.action=list``, one short boot while pytest collects). The cases run when
    their items do: one boot runs every selected case (:class:`KunitCase`)."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        glob = settings.kunit or "*"
        listing = boot_kunit(self.config, settings, glob, action="list")
        boot_error, tail = listing.error, listing.tail
        names = [line.strip() for line in listing.text.splitlines()
                 if KUNIT_LISTED.match(line.strip())]
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
    """What a KUnit machine printed, and the error if it did not come up."""

    console: Console | None
    tail: str
    error: UmttError | None

    @property
    def text(self) -> str:
        """The whole console."""
        return self.console.text if self.console else ""


def boot_kunit(config: pytest.Config, settings: Settings, glob: str,
               action: str | None = None) -> KunitBoot:
    """Boot a machine that runs (or lists) the KUnit cases matching ``glob`` (a case may
    crash it: that is reported, not raised)."""
    started = time.monotonic()
    sim = open_simulation(config, settings)
    boot_error: UmttError | None = None
    cmdline = ["kunit.enable=1", f"kunit.filter_glob={glob}"]
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
    return KunitBoot(console, tail, boot_error)


KUNIT_RUNS = pytest.StashKey[dict[str, "KunitResults"]]()


@dataclass(frozen=True, slots=True)
class KunitResults:
    """What one boot reported: each case by name, and what to say of a case it did not."""

    glob: str
    cases: dict[str, KtapCase]
    console: Console | None
    missing: str
    splats: dict[str, list[Splat]] = field(default_factory=dict)
    """The boot's splats, by the case they appeared in (:func:`splats_by_case`)."""


def splats_by_case(console: Console | None, cases: list[KtapCase]) -> dict[str, list[Splat]]:
    """Each splat of a KUnit boot, given to the case during which it appeared: the last
    case whose console lines start at or before the splat's header (what a suite's exit
    or the next suite's init prints goes with the case before it), or the first case
    (the boot before any). Cases' lines are indices into the console's ``text.splitlines()``."""
    if console is None or not cases or not console.splats:
        return {}
    position, index = {}, 0
    for line in console.lines:
        position[id(line)] = index
        index += max(1, len(line.text.splitlines()))  # splitlines splits at \f, \x1c...
    ordered = sorted(cases, key=lambda case: case.lines.start)
    found: dict[str, list[Splat]] = {}
    for splat in console.splats:
        at = position.get(id(splat.header), 0)
        case = next((c for c in reversed(ordered) if c.lines.start <= at), ordered[0])
        found.setdefault(case.name, []).append(splat)
    return found


def crash_console(console: Console | None, case: KtapCase) -> str:
    """The console from a crashed case on, each line with its virtual time."""
    if console is None:
        return ""
    shown = console.lines[case.lines.start:case.lines.start + CONSOLE_TAIL]
    return "console from the crash on:\n" + "\n".join(str(line) for line in shown)


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
        splats = results.splats.get(self.name, [])
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
            self.detail = crash_console(results.console, case)
        if case.skipped:
            pytest.skip(case.reason or "skipped by KUnit")
        if not case.ok:
            raise KunitFailure("\n".join([*case.diagnostics, self.detail]).strip() or "not ok")

    def _results(self) -> KunitResults:
        glob = self._glob()
        runs = self.config.stash.setdefault(KUNIT_RUNS, {})
        if glob not in runs:
            settings = self.config.stash[STATE].settings
            boot = boot_kunit(self.config, settings, glob)
            missing = (f"the machine did not come up: {boot.error}" if boot.error is not None else
                       f"the kernel stopped reporting before it (console tail:\n{boot.tail})")
            cases = parse_ktap(boot.text)
            runs[glob] = KunitResults(glob, {c.name: c for c in cases}, boot.console, missing,
                                      splats_by_case(boot.console, cases))
        return runs[glob]

    def _glob(self) -> str:
        """The narrowest glob for the cases selected in this session: one case, one
        suite, or the session's own (``--umtt-kunit``); a case outside it still runs."""
        selected = [item.name for item in self.session.items if isinstance(item, KunitCase)]
        suites = {name.split(".")[0] for name in selected}
        if len(selected) == 1:
            return selected[0]
        if len(suites) == 1:
            return f"{suites.pop()}"
        return self.config.stash[STATE].settings.kunit or "*"

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


class KselftestFailure(Exception):
    """A kselftest failed, crashed its kernel, or outran a budget."""


class KselftestRun(pytest.Collector):
    """An installed kselftest tree: one item per test of its list, run when the item runs
    (so ``-k`` selects what boots, and xdist spreads the tests over its workers), each in
    a fresh machine: a crash, a hang or a changed clock cannot touch the next test, and a
    test's run does not depend on which others ran. The KTAP subtests a test prints are
    reported beside it, as results of their own."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        assert settings.kselftest is not None
        return [KselftestItem.from_parent(self, name=test.id, test=test)
                for test in read_tests(settings.kselftest)]


class KselftestItem(pytest.Item):
    """One kselftest: it runs in a machine of its own when the item runs."""

    def __init__(self, *, test: KselftestTest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.test = test
        self.result: KselftestResult | None = None
        self.splats: list[Splat] = []
        """What the test's kernel reported and survived (a splat fails the test)."""

    def runtest(self) -> None:
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
            self._report_subtest(case)
        if result.outcome is Outcome.SKIP:
            pytest.skip(result.detail)
        if result.outcome is not Outcome.PASS:
            raise KselftestFailure(self._failure_text())

    def _run(self) -> KselftestResult:
        settings = self.config.stash[STATE].settings
        root, test = settings.kselftest, self.test
        assert root is not None
        started = time.monotonic()
        sim = open_simulation(self.config, settings)
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

    def _report_subtest(self, case: KtapCase) -> None:
        """A KTAP subtest's result as a report of its own (``TEST/SUBTEST``): they are
        known only once the test ran, too late to be collected as items. Logged once the
        test's own reports are (:func:`pytest_runtest_protocol`), outside its capture."""
        longrepr: Any = None
        outcome: Literal["passed", "failed", "skipped"] = "passed"
        if case.skipped:
            outcome = "skipped"
            longrepr = (str(self.path), 0, f"Skipped: {case.reason or 'skipped (KTAP)'}")
        elif not case.ok:
            outcome = "failed"
            longrepr = (f"kselftest {self.name}/{case.name}: "
                        + ("\n".join(case.diagnostics) or "not ok"))
        # pytest's subtest reports: the test's own node id (xdist requires it), the
        # subtest's name as their context; shown as SUBPASSED[name] and counted apart.
        report = pytest.SubtestReport(
            nodeid=self.nodeid, location=self.location, keywords={}, outcome=outcome,
            longrepr=longrepr, when="call", user_properties=[("umtt_ktap_subtest", case.name)])
        report.context = KtapContext(msg=case.name)  # type: ignore[assignment]
        self.config.stash.setdefault(SUBTEST_REPORTS, {}).setdefault(self.nodeid, []).append(
            report)


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
