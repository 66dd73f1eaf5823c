"""Splats fail tests: a report the kernel survived (uml/splats.py) on any machine while a
test ran fails that test, after it ran, unless a marker or option allows it.

Each machine's splats are handed out once, in order, to the test that was running when
their first line was seen: a machine kept across tests (``umtt_module_machine``) blames each test
for its own. Splats seen by the end of a test's call fail its call phase (a ``FAILED``
test, whose report says whether the test itself passed); splats printed while its
machines power off (a driver's remove path) fail its teardown.
"""

from __future__ import annotations

import json
import weakref
from collections import Counter
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field

import pytest

from ..simulation import Simulation
from ..summary import SPLATS
from ..uml.machine import Machine
from ..uml.splats import Splat
from .settings import SplatAllowance
from .state import ITEM_SIM, STATE, settings_of

SHOWN_IN_FULL = 5
"""Splats a failure shows whole; the rest by signature only."""
LISTED = 20
"""Signatures listed (with their counts) for the splats beyond those shown whole."""
MAX_SIGNATURES = 100
"""Distinct signatures a report carries to the summary (a flood of splats is counted by
signature, and bounded)."""


@dataclass
class PhaseSplats:
    """The splats one phase of a test saw, split by whether they may pass."""

    failing: list[Splat] = field(default_factory=list)
    allowed: list[tuple[Splat, SplatAllowance]] = field(default_factory=list)
    raised: bool = False
    """This module failed the phase with them (else the phase failed on its own)."""


PHASE_SPLATS = pytest.StashKey[dict[str, PhaseSplats]]()


class SplatWatcher:
    """Hands each machine's new splats to the test running, and fails it for them."""

    def __init__(self) -> None:
        self._handed_out: weakref.WeakKeyDictionary[Machine, int] = weakref.WeakKeyDictionary()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._judged(item, "call"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, None, None]:
        return (yield from self._judged(item, "teardown"))

    def _judged(self, item: pytest.Item, phase: str) -> Generator[None, None, None]:
        """Run a phase, then judge the splats that appeared meanwhile."""
        sims = _watched(item)  # before a teardown closes them
        try:
            result = yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # A test that skips after a splat is failed by it all the same.
            judge(item, phase, self._new_splats(sims),
                  already_failed=not isinstance(exc, pytest.skip.Exception))
            raise
        judge(item, phase, self._new_splats(sims), already_failed=False)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        seen = item.stash.get(PHASE_SPLATS, {}).get(report.when)
        if seen is not None:
            _annotate(report, seen)
        return report

    def _new_splats(self, sims: Iterable[Simulation]) -> list[Splat]:
        """Splats no test has been given yet, on every machine of ``sims``."""
        found: list[Splat] = []
        for sim in sims:
            for machine in sim.machines.values():
                splats = machine.splats
                found += splats[self._handed_out.get(machine, 0):]
                self._handed_out[machine] = len(splats)
        return sorted(found, key=lambda splat: (splat.time_ns, splat.machine))


def judge(item: pytest.Item, phase: str, splats: list[Splat], *, already_failed: bool) -> None:
    """Split ``splats`` by whether the item's settings allow them and keep them for its
    report; fail the phase with those that may not pass, unless it failed already."""
    if not splats:
        return
    seen = PhaseSplats()
    allowances = settings_of(item).allow_splat
    for splat in splats:
        allowance = _allowance(splat, allowances)
        if allowance is None:
            seen.failing.append(splat)
        else:
            seen.allowed.append((splat, allowance))
    item.stash.setdefault(PHASE_SPLATS, {})[phase] = seen
    # On the item: the teardown report carries every phase's, to the summary (with xdist
    # too) and to JUnit XML, which writes the teardown report's properties.
    item.user_properties.append((SPLATS, _recorded(seen)))
    if seen.failing and not already_failed:
        seen.raised = True
        pytest.fail(failure_text(seen.failing, phase, test_failed=False), pytrace=False)


def _watched(item: pytest.Item) -> list[Simulation]:
    """The simulations whose machines can print during this test: the test's own and
    every other one open (module-scoped ones)."""
    sims = list(item.config.stash[STATE].open)
    own = item.stash.get(ITEM_SIM, None)
    if own is not None and own not in sims:
        sims.append(own)
    return sims


def _allowance(splat: Splat, allowances: Iterable[SplatAllowance]) -> SplatAllowance | None:
    signature = splat.signature
    return next((allowance for allowance in allowances
                 if allowance.allows(splat.kind, splat.header.text, signature)), None)


def _recorded(seen: PhaseSplats) -> str:
    """``[[signature, reason, count]]`` as JSON (reason null: they failed the test),
    bounded to :data:`MAX_SIGNATURES` signatures."""
    counted = Counter([(splat.signature, None) for splat in seen.failing]
                      + [(splat.signature, allowance.reason) for splat, allowance in seen.allowed])
    return json.dumps([[signature, reason, count] for (signature, reason), count
                       in counted.most_common(MAX_SIGNATURES)])


def _annotate(report: pytest.TestReport, seen: PhaseSplats) -> None:
    """The splats a phase saw, as sections where the failure text does not already show
    them."""
    if seen.failing and not seen.raised:
        report.sections.append(("umtt splats", failure_text(seen.failing, report.when,
                                                            test_failed=True)))
    if seen.allowed:
        report.sections.append(("umtt splats (allowed)", "\n\n".join(
            f"allowed ({allowance.reason}; {allowance.where}):\n{splat.render()}"
            for splat, allowance in seen.allowed)))


def failure_text(splats: list[Splat], phase: str, *, test_failed: bool) -> str:
    """What a test that splats is told: the first splat's signature on the first line
    (pytest's short summary shows it), then each splat (at most :data:`SHOWN_IN_FULL`
    whole), and how to let a known one pass."""
    first = splats[0]
    count = "a kernel splat" if len(splats) == 1 else f"{len(splats)} kernel splats, first"
    if phase == "call":
        when = f"the test {'failed on its own too' if test_failed else 'itself passed'}"
    else:
        when = f"after the test, during its {phase}"
    shown = [splat.render() for splat in splats[:SHOWN_IN_FULL]]
    rest = splats[SHOWN_IN_FULL:]
    if rest:
        counted = Counter((splat.machine, splat.signature) for splat in rest)
        listed = [f"  {count}x on {machine}: {signature}"
                  for (machine, signature), count in counted.most_common(LISTED)]
        if len(counted) > LISTED:
            listed.append(f"  ... and {len(counted) - LISTED} more signatures")
        shown.append(f"and {len(rest)} more:\n" + "\n".join(listed))
    return "\n\n".join([f"{count} on {first.machine}: {first.signature} ({when})", *shown,
                        "a known splat may pass: @pytest.mark.umtt_allow_splat(PATTERN, "
                        "reason=...) on the test, or --umtt-allow-splat=PATTERN (a regular "
                        "expression searched in the kind, the first line and the signature)"])
