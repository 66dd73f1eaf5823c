"""Triage in pytest: a failure's signature on its report and in JUnit XML, the explore
summary file, shrinking a failing perturbed run (``--umtt-shrink``) and replaying the
schedule it wrote (``--umtt-schedule``).

Shrinking reruns the failing item in this process (``runtestprotocol``, as a rerun does,
with nothing logged), each time keeping a chosen subset of the decisions the failing run
made (:class:`~pytest_umtt.controller.perturb.Decisions`) and reverting the others, and
searches with delta debugging (:func:`~pytest_umtt.triage.ddmin`) for the fewest that
still fail it with the same signature.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from _pytest.runner import runtestprotocol

from ..bundle import STORE, SUFFIX
from ..controller.perturb import Decision, Decisions
from ..kernel import kernel_identity
from ..simulation import Simulation
from ..summary import SIGNATURE, node_filename
from ..triage import ddmin, failure_signature
from .replay import BUNDLE_REQUEST, BundleRequest, replayed_decisions
from .settings import Settings
from .state import ITEM_SIM, STATE, artifacts_dir, base_nodeid, settings_of

SCHEDULE_FORMAT = "pytest-umtt schedule"
SCHEDULE_VERSION = 1
MAX_SHRINK_RUNS = 100
"""Reruns one shrink may take; past it the smallest failing schedule so far is kept."""
SCHEDULES_DIR = "umtt-schedules"
"""Where ``--umtt-shrink`` writes schedules without ``--umtt-artifacts`` (in the
directory pytest was started from)."""


@dataclass(frozen=True)
class FailedRun:
    """A failed run of an item: its signature and the perturbed decisions it made."""

    signature: str
    decisions: tuple[Decision, ...]


@dataclass(frozen=True)
class Schedule:
    """A test, a seed and the perturbed decisions to apply: what ``--umtt-schedule``
    replays (every other decision goes back to its unperturbed value)."""

    nodeid: str
    seed: int
    perturb: bool
    decisions: tuple[Decision, ...]
    path: Path | None = None

    @property
    def keep(self) -> frozenset[str]:
        return frozenset(decision.key for decision in self.decisions)

    def to_json(self, **extra: Any) -> dict[str, Any]:
        return {"format": SCHEDULE_FORMAT, "version": SCHEDULE_VERSION,
                "nodeid": self.nodeid, "seed": self.seed, "perturb": self.perturb,
                "decisions": [d.to_json() for d in self.decisions], **extra}

    @classmethod
    def load(cls, path: Path) -> Schedule:
        """Read a schedule file; a UsageError naming the file and what is wrong."""
        try:
            data = json.loads(path.read_text())
            if data.get("format") != SCHEDULE_FORMAT or data.get("version") != SCHEDULE_VERSION:
                raise ValueError(f"not a {SCHEDULE_FORMAT} version {SCHEDULE_VERSION} file")
            return cls(str(data["nodeid"]), int(data["seed"]), bool(data["perturb"]),
                       tuple(Decision.from_json(d) for d in data["decisions"]), path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise pytest.UsageError(f"--umtt-schedule={path}: cannot read the schedule: "
                                    f"{type(exc).__name__}: {exc}") from None


KEEP = pytest.StashKey[frozenset[str]]()
"""On an item being shrunk: the decisions this rerun keeps."""
FAILED = pytest.StashKey[FailedRun]()
SCHEDULE = pytest.StashKey["Schedule | None"]()


# --- what the umtt_sim fixture asks -------------------------------------------------------

def simulation_inputs(item: pytest.Item, settings: Settings) -> tuple[Settings, Decisions]:
    """The settings and decision policy of an item's simulation: a shrink rerun keeps
    its subset (and writes no artifacts over the failing run's); an item a schedule
    names runs with its seed and decisions; any other applies every decision."""
    keep = item.stash.get(KEEP, None)
    if keep is not None:
        return replace(settings, artifacts=None), Decisions(keep)
    replayed = replayed_decisions(item.config.stash[STATE], item.nodeid)
    if replayed is not None:
        return settings, replayed
    schedule = item.config.stash.get(SCHEDULE, None)
    if schedule is not None and base_nodeid(item.nodeid) == schedule.nodeid:
        return replace(settings, seed=schedule.seed, perturb=schedule.perturb,
                       seed_source=f"--umtt-schedule={schedule.path}"), \
            Decisions(schedule.keep)
    return settings, Decisions()


def reproduce_command(nodeid: str, settings: Settings) -> str:
    """The command that reruns this test the same way, perturbation included."""
    if settings.schedule is not None and settings.seed_source.startswith("--umtt-schedule"):
        command = f"pytest {shlex.quote(base_nodeid(nodeid))} --umtt-schedule={settings.schedule}"
    else:
        command = f"pytest {shlex.quote(base_nodeid(nodeid))} --umtt-seed={settings.seed}"
        command += " --umtt-perturb" if settings.perturb else ""
    if settings.kernel is not None:
        command += f" --uml-kernel={shlex.quote(str(settings.kernel))}"
    if settings.rootfs != "pinned":
        command += f" --umtt-rootfs={settings.rootfs}"
    return command


def record_identity(item: pytest.Item, settings: Settings, sim: Simulation) -> None:
    """User properties (JUnit XML ``<properties>``): how to rerun the test, and the
    kernel and root a run depends on besides its seed."""
    item.user_properties.append(("umtt_reproduce", reproduce_command(item.nodeid, settings)))
    if settings.kernel is not None:
        item.user_properties.append(("umtt_kernel", str(kernel_identity(settings.kernel))))
    root = "host / (hostfs)" if sim.rootfs is None else sim.rootfs.identity
    item.user_properties.append(("umtt_root", root))


# --- the plugin ----------------------------------------------------------------------------

class TriagePlugin:
    """Signatures on failed reports, shrinking, and the explore summary file."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker = hasattr(config, "workerinput")
        self.shrunk: set[tuple[str, str]] = set()  # (test, signature): one shrink each
        settings = config.stash[STATE].settings
        config.stash[SCHEDULE] = None if settings.schedule is None \
            else Schedule.load(settings.schedule)
        config.stash[STATE].summary.reproduce_options = " --umtt-perturb" \
            if settings.perturb else ""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        """A schedule replays one test: running others instead would replay nothing."""
        schedule = self.config.stash[SCHEDULE]
        if schedule is None or self.worker:
            return
        if not any(base_nodeid(item.nodeid) == schedule.nodeid for item in items):
            raise pytest.UsageError(
                f"--umtt-schedule={schedule.path} replays {schedule.nodeid}, which is not "
                f"among the tests collected; run: pytest {shlex.quote(schedule.nodeid)} "
                f"--umtt-schedule={schedule.path}")

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]
                                  ) -> Any:
        report: pytest.TestReport = yield
        if call.excinfo is None or not report.failed or call.when == "teardown":
            return report
        signature = failure_signature(call.excinfo.value)
        report.user_properties.append((SIGNATURE, signature))
        item.user_properties.append((SIGNATURE, signature))  # the teardown report's too
        sim = item.stash.get(ITEM_SIM, None)
        failed = FailedRun(signature, () if sim is None else tuple(sim.decisions.applied))
        item.stash[FAILED] = failed
        if failed.decisions and KEEP not in item.stash:
            report.sections.append(("umtt perturbed decisions", _shrink_hint(item, failed)))
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None
                                ) -> Any:
        _forget(item, FAILED)
        result = yield
        failed = item.stash.get(FAILED, None)
        if failed is not None and settings_of(item).shrink:
            # Explored seeds that fail the same way are one failure: shrink the first.
            key = (base_nodeid(item.nodeid), failed.signature)
            if key not in self.shrunk:
                self.shrunk.add(key)
                self.config.stash[STATE].summary.shrinks.append(
                    self._shrink(item, nextitem, failed))
        return result

    @staticmethod
    def _shrink(item: pytest.Item, nextitem: pytest.Item | None,
                failed: FailedRun) -> dict[str, Any]:
        try:
            return Shrink(item, nextitem, failed).run()
        except Exception as exc:  # the test's verdict stands; say why there is no schedule
            return {"nodeid": base_nodeid(item.nodeid), "seed": settings_of(item).seed,
                    "outcome": f"could not shrink: {type(exc).__name__}: {exc}"}

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker:
            return
        state = self.config.stash[STATE]
        settings = state.settings
        target = settings.explore_json or (
            settings.artifacts / "explore.json" if settings.artifacts is not None else None)
        if target is None or not state.summary.explored:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({
            "seeds_per_test": settings.explore, "first_seed": settings.seed,
            "perturb": settings.perturb,
            "kernel": str(kernel_identity(settings.kernel)) if settings.kernel else None,
            "root": state.rootfs.identity if state.rootfs is not None else settings.rootfs,
            "tests": state.summary.explore_report()}, indent=2))


# --- shrinking -----------------------------------------------------------------------------

class Shrink:
    """Reduce one failed run of ``item`` to the fewest perturbed decisions that still
    fail it the same way (the same signature)."""

    def __init__(self, item: pytest.Item, nextitem: pytest.Item | None,
                 failed: FailedRun) -> None:
        self.item = item
        self.nextitem = nextitem
        self.failed = failed
        self.settings = settings_of(item)
        self.applied: dict[frozenset[str], tuple[Decision, ...]] = {}
        self.runs = 0
        self.terminal = item.config.pluginmanager.get_plugin("terminalreporter")

    def run(self) -> dict[str, Any]:
        """Search, write the schedule, and say what was found (for the summary)."""
        started = time.monotonic()
        keys = [decision.key for decision in self.failed.decisions]
        entry: dict[str, Any] = {"nodeid": base_nodeid(self.item.nodeid),
                                 "seed": self.settings.seed, "before": len(keys),
                                 "signature": self.failed.signature}
        entry.update(self._search(keys))
        entry["seconds"] = round(time.monotonic() - started, 1)
        entry["runs"] = self.runs
        entry["outcome"] += f" ({self.runs} reruns, {entry['seconds']} s wall)"
        return entry

    def _search(self, keys: list[str]) -> dict[str, Any]:
        if not keys:
            return {"outcome": "nothing to shrink: the failing run made no perturbed "
                               "decision (its seed alone decides the failure)"}
        if not self.fails(keys):
            return {"outcome": "did not fail the same way again with all its decisions "
                               "kept: the run depends on more than its seed and schedule"}
        if self.fails([]):
            return {"outcome": "fails the same way with every decision reverted: it needs "
                               "no perturbation", **self._written([])}
        result = ddmin(keys, self.fails, budget=MAX_SHRINK_RUNS - self.runs)
        done = "" if result.complete else \
            f" (stopped after {MAX_SHRINK_RUNS} reruns: smaller may exist)"
        minimal = self.applied[frozenset(result.minimal)]
        return {"outcome": f"{_count(self.failed.decisions)} -> {_count(minimal)}{done}",
                "after": len(minimal), "complete": result.complete,
                **self._written(list(minimal))}

    def fails(self, keep: list[str]) -> bool:
        """Rerun the item keeping ``keep``: does it fail with the same signature?"""
        item = self.item
        saved = list(item.user_properties)
        item.stash[KEEP] = frozenset(keep)
        _forget(item, FAILED)
        _forget(item, ITEM_SIM)
        try:
            runtestprotocol(item, nextitem=self.nextitem, log=False)
        finally:
            item.user_properties[:] = saved
            del item.stash[KEEP]
        self.runs += 1
        sim = item.stash.get(ITEM_SIM, None)
        self.applied[frozenset(keep)] = () if sim is None else tuple(sim.decisions.applied)
        failed = item.stash.get(FAILED, None)
        same = failed is not None and failed.signature == self.failed.signature
        self._progress(keep, failed, same)
        return same

    def _progress(self, keep: list[str], failed: FailedRun | None, same: bool) -> None:
        if self.terminal is None:
            return
        verdict = "fails the same way" if same else \
            "passes" if failed is None else f"fails otherwise: {failed.signature}"
        self.terminal.write_line(f"umtt shrink: rerun {self.runs} keeping {len(keep)} "
                                 f"decisions: {verdict}")

    def _written(self, minimal: list[Decision]) -> dict[str, Any]:
        """Write the schedule where a later run finds it, and a bundle of one more run
        with it; what the summary shows."""
        schedule = Schedule(base_nodeid(self.item.nodeid), self.settings.seed,
                            self.settings.perturb, tuple(minimal))
        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(schedule.to_json(
            signature=self.failed.signature, before=len(self.failed.decisions),
            reruns=self.runs), indent=2) + "\n")
        return {"file": str(path), "schedule": [d.describe() for d in minimal],
                **self._bundled(minimal, path.with_name(path.stem + SUFFIX))}

    def _bundled(self, minimal: list[Decision], target: Path) -> dict[str, Any]:
        """Rerun keeping ``minimal`` once more, writing its replay bundle at ``target``
        (the guest root shared in the directory's store, as ``--umtt-bundle`` does)."""
        store = (self.settings.artifacts or target.parent) / STORE
        self.item.stash[BUNDLE_REQUEST] = BundleRequest(target, store, tuple(minimal))
        try:
            same = self.fails([decision.key for decision in minimal])
        finally:
            del self.item.stash[BUNDLE_REQUEST]
        if not target.is_file():
            return {"bundle_error": "its rerun wrote no bundle (see the rerun's error)"}
        if not same:
            return {"bundle": str(target), "bundle_error": "its rerun did not fail the same "
                    "way: the bundle holds that run"}
        return {"bundle": str(target)}

    def _path(self) -> Path:
        target = artifacts_dir(self.settings, self.item.nodeid)
        if target is not None:
            return target / "schedule.json"
        name = node_filename(base_nodeid(self.item.nodeid))
        return (self.item.config.invocation_params.dir / SCHEDULES_DIR
                / f"{name}.seed{self.settings.seed}.json")


def _shrink_hint(item: pytest.Item, failed: FailedRun) -> str:
    """What a failed run's perturbed decisions were, and how to find those it needs."""
    settings = settings_of(item)
    return (f"signature: {failed.signature}\n"
            f"this run made {_count(failed.decisions)}; the fewest that fail it:\n"
            f"  {reproduce_command(item.nodeid, settings)} --umtt-shrink")


def _count(decisions: tuple[Decision, ...]) -> str:
    """``260 perturbed decisions (259 tie, 1 reorder)``."""
    kinds = Counter(decision.kind for decision in decisions)
    detail = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    plural = "" if len(decisions) == 1 else "s"
    return f"{len(decisions)} perturbed decision{plural}" + (f" ({detail})" if detail else "")


def _forget(item: pytest.Item, key: pytest.StashKey[Any]) -> None:
    if key in item.stash:
        del item.stash[key]
