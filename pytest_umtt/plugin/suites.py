"""The kernel's own suites as items: KUnit cases and kselftests."""

from __future__ import annotations

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
from .settings import CONSOLE_TAIL
from .state import STATE, artifacts_dir, close_simulation, machine_factory, open_simulation


class KunitFailure(Exception):
    """A KUnit case reported ``not ok``."""


class KunitRun(pytest.Collector):
    """The kernel's KUnit suites, run at boot; one item per test case (KTAP)."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        glob = settings.kunit or "*"
        started = time.monotonic()
        sim = open_simulation(self.config, settings)
        boot_error: UmttError | None = None
        try:
            machine_factory(self.config, sim, settings)(
                "kunit", cmdline=["kunit.enable=1", f"kunit.filter_glob={glob}"])
        except UmttError as exc:  # a case may crash the kernel: report it, run the rest
            boot_error = exc
        finally:
            machine = sim.machines.get("kunit")
            console = machine.console if machine else None
            text = console.text if console else ""
            tail = machine.console_tail() if machine else ""
            close_simulation(self.config, sim, started, None)
        items: list[pytest.Item] = [
            KunitCase.from_parent(self, name=case.name, case=case, detail=(
                crash_console(console, case) if case.crashed else ""))
            for case in parse_ktap(text)]
        if boot_error is not None:
            items.append(KunitCase.from_parent(self, name="boot", case=None, detail=(
                f"the KUnit machine did not come up: {boot_error}")))
        elif not items:
            items.append(KunitCase.from_parent(self, name="no-cases", case=None, detail=(
                f"no KUnit test case matched {glob!r} (is the suite built in?)\n{tail}")))
        return items


def crash_console(console: Console | None, case: KtapCase) -> str:
    """The console from a crashed case on, each line with its virtual time."""
    if console is None:
        return ""
    shown = console.lines[case.lines.start:case.lines.start + CONSOLE_TAIL]
    return "console from the crash on:\n" + "\n".join(str(line) for line in shown)


class KunitCase(pytest.Item):
    """One KUnit test case's result, as the kernel reported it."""

    def __init__(self, *, case: KtapCase | None, detail: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.detail = detail

    def runtest(self) -> None:
        if self.case is None:
            raise KunitFailure(self.detail)
        if self.case.skipped:
            pytest.skip(self.case.reason or "skipped by KUnit")
        if not self.case.ok:
            raise KunitFailure("\n".join([*self.case.diagnostics, self.detail]).strip()
                               or "not ok")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, KunitFailure):
            how = "crashed" if self.case is not None and self.case.crashed else "failed"
            return f"KUnit: {self.name} {how}\n{excinfo.value}"
        return str(super().repr_failure(excinfo, style))

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

    def runtest(self) -> None:
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
        """This test alone, the same way: its tree, seed and kernel."""
        settings = self.config.stash[STATE].settings
        words = ["pytest", f"--umtt-kselftest={settings.kselftest}", "-k", self.name,
                 f"--umtt-seed={settings.seed}"]
        if settings.kernel is not None:
            words.append(f"--uml-kernel={settings.kernel}")
        return shlex.join(words)

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
