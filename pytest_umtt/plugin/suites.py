"""The kernel's own suites as items: KUnit cases and kselftests."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
from .settings import CONSOLE_TAIL, Settings
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
    """An installed kselftest tree: each test runs in a fresh machine (a crash, a hang or
    a changed clock cannot touch the next test, and a test's run does not depend on
    which others ran); one item per test and one per KTAP subtest it printed."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        assert settings.kselftest is not None
        items: list[pytest.Item] = []
        for test in read_tests(settings.kselftest):
            result = self._run(settings, settings.kselftest, test)
            items.append(KselftestItem.from_parent(self, name=test.id, result=result))
            items += [KselftestItem.from_parent(self, name=f"{test.id}/{case.name}",
                                                result=result, case=case)
                      for case in result.cases]
        return items

    def _run(self, settings: Settings, root: Path, test: KselftestTest) -> KselftestResult:
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


class KselftestItem(pytest.Item):
    """A kselftest's result (or one of its KTAP subtests'), as the run reported it."""

    def __init__(self, *, result: KselftestResult, case: KtapCase | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.result = result
        self.case = case
        if case is None:
            self.user_properties += [
                ("umtt_virtual_seconds", f"{result.virtual:.9f}"),
                ("umtt_wall_seconds", f"{result.wall_seconds:.3f}")]

    def runtest(self) -> None:
        if self.case is not None:
            if self.case.skipped:
                pytest.skip(self.case.reason or "skipped (KTAP)")
            if not self.case.ok:
                raise KselftestFailure("\n".join(self.case.diagnostics) or "not ok")
            return
        if self.result.outcome is Outcome.SKIP:
            pytest.skip(self.result.detail)
        if self.result.outcome is not Outcome.PASS:
            raise KselftestFailure(self._failure_text())

    def _failure_text(self) -> str:
        result = self.result
        lines = result.output.splitlines()[-CONSOLE_TAIL:]
        return (f"{result.outcome.value}: {result.detail}\n"
                f"({result.virtual:.3f} s virtual, {result.wall_seconds:.1f} s wall)"
                + (f"\n--- output (last {len(lines)} lines) ---\n" + "\n".join(lines)
                   if lines else "\n(no output)"))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, KselftestFailure):
            return f"kselftest {self.name}: {excinfo.value}"
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"kselftest: {self.name}"
