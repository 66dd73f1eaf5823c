"""The session's numbers and verdicts, the same with or without xdist.

:class:`Summary` is plain data; :class:`SummaryReporter` is registered as a plugin (like
xdist's DSession). Each process counts its own simulations; workers send them home in
``workeroutput``. Determinism pairs and explored seeds are read from the test reports in
the process that shows the summary: with xdist the two runs of one test may land on two
workers, and only the controller sees both.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from .errors import NS_PER_S, format_ns
from .triage import format_rate, wilson_interval

FINGERPRINT = "umtt_fingerprint"
"""User property: the digest of a determinism run's fingerprint (with its run number)."""
EXPLORED_SEED = "umtt_explored_seed"
"""User property: the seed of an ``--umtt-explore`` item."""
SPLATS = "umtt_splats"
"""User property, once per test phase that saw kernel splats: JSON ``[[signature,
reason, count]]`` (reason null: they failed the test)."""
SIGNATURES_LISTED = 10
SIGNATURE = "umtt_signature"
"""User property: a failed test's failure signature (:func:`.triage.failure_signature`)."""


@dataclass(frozen=True)
class Variant:
    """How one item varies a test: an explored seed, a determinism run, or neither. Its
    ``id`` is the suffix pytest puts in the item's node id; :func:`base_nodeid` and
    :func:`pair_key` read it back."""

    seed: int | None = None
    run: int | None = None

    @property
    def id(self) -> str:
        parts = [] if self.seed is None else [f"seed={self.seed}"]
        return "-".join(parts + ([] if self.run is None else [f"determinism-{self.run}"]))


_VARIANT_PART = re.compile(r"-?(seed=\d+|determinism-[12])")
_RUN_NUMBER = re.compile(r"(?<=determinism)-[12]")


def base_nodeid(nodeid: str) -> str:
    """The test's node id without the variant pytest-umtt added."""
    return _VARIANT_PART.sub("", nodeid).replace("[]", "").replace("[-", "[")


def node_filename(nodeid: str) -> str:
    """A node id as one file or directory name (artifacts, schedules, coverage)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")


def pair_key(nodeid: str) -> str:
    """What a determinism run's two items share: the node id without the run number
    (an explored seed stays: each seed's runs are a pair of their own)."""
    return _RUN_NUMBER.sub("", nodeid)


@dataclass
class RunPairs:
    """The determinism check's runs, paired in one place. A run is added when its fixture
    ends (with its fingerprint, to show where two runs part) and again when its report
    reaches the summary (its digest only: with xdist the two runs may end on two workers,
    and only the controller sees both); the second addition of one run changes nothing,
    and each pair is judged once."""

    waiting: dict[str, tuple[str, str, list[str]]] = field(default_factory=dict)
    """pair key -> the first run's node id, digest and fingerprint (empty when only its
    report was seen)."""
    judged: dict[str, bool] = field(default_factory=dict)
    """pair key -> whether the two runs were the same, in the order they were judged."""
    differed: list[str] = field(default_factory=list)
    """The tests whose two runs differed (node ids without the variant)."""

    def add(self, nodeid: str, digest: str, fingerprint: Sequence[str] = ()
            ) -> tuple[bool, list[str]] | None:
        """Record a run; when it completes a pair, judge it by digest and return whether
        the runs were the same, with the other run's fingerprint."""
        key = pair_key(nodeid)
        first = self.waiting.get(key)
        if key in self.judged:
            return None
        if first is None or first[0] == nodeid:
            kept = list(fingerprint) or (first[2] if first else [])
            self.waiting[key] = (nodeid, digest, kept)
            return None
        del self.waiting[key]
        self.judged[key] = first[1] == digest
        if not self.judged[key]:
            self.differed.append(base_nodeid(nodeid))
        return self.judged[key], first[2]


@dataclass(frozen=True)
class Explored:
    """One explored seed of a test: whether it failed, and how."""

    seed: int
    failed: bool
    signature: str = ""


def signature_groups(outcomes: list[Explored]) -> list[tuple[str, list[int]]]:
    """Failing seeds grouped by signature, the largest group first (then by first seed)."""
    groups: dict[str, list[int]] = {}
    for outcome in sorted(outcomes, key=lambda o: o.seed):
        if outcome.failed:
            groups.setdefault(outcome.signature or "(no signature)", []).append(outcome.seed)
    return sorted(groups.items(), key=lambda group: (-len(group[1]), group[1][0]))


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds))


@dataclass
class Summary:
    """What the terminal summary shows."""

    simulations: int = 0
    virtual_ns: int = 0
    wall_seconds: float = 0.0
    pairs: RunPairs = field(default_factory=RunPairs)
    explored: dict[str, list[Explored]] = field(default_factory=dict)
    shrinks: list[dict[str, Any]] = field(default_factory=list)
    """What ``--umtt-shrink`` found, one entry per failing test (see plugin/triage.py)."""
    module_bundles: list[str] = field(default_factory=list)
    """Replay bundles of modules whose tests share a simulation (``uml_module``)."""
    reproduce_options: str = ""
    """Options a reproduce command needs besides the seed (``--umtt-perturb``)."""
    splats_failed: dict[str, list[str]] = field(default_factory=dict)
    """Signature of each splat that failed a test: the tests it failed."""
    splats_allowed: dict[str, list[str]] = field(default_factory=dict)
    """Signature of each splat a marker or option let pass: the tests it was seen in."""

    def add_simulation(self, virtual_ns: int, wall_seconds: float) -> None:
        self.simulations += 1
        self.virtual_ns += virtual_ns
        self.wall_seconds += wall_seconds

    def add_worker(self, counts: dict[str, Any]) -> None:
        """A worker's own counts (what it simulated)."""
        self.simulations += int(counts["simulations"])
        self.virtual_ns += int(counts["virtual_ns"])
        self.wall_seconds += float(counts["wall_seconds"])
        self.shrinks += list(counts.get("shrinks", []))
        self.module_bundles += list(counts.get("module_bundles", []))

    def lines(self) -> list[str]:
        """The summary's lines (none when nothing was simulated)."""
        if not self.simulations:
            return []
        speedup = self.virtual_ns / NS_PER_S / self.wall_seconds if self.wall_seconds else 0.0
        lines = [f"{self.simulations} simulations: {format_ns(self.virtual_ns)} of virtual "
                 f"time in {self.wall_seconds:.2f} s wall ({speedup:.1f}x)"]
        if self.pairs.judged:
            differed = self.pairs.differed
            lines.append(f"determinism: {len(self.pairs.judged)} tests run twice, "
                         f"{len(differed)} differed"
                         + "".join(f"\n  differs: {nodeid}" for nodeid in differed))
        for nodeid, outcomes in self.explored.items():
            lines += self._explore_lines(nodeid, outcomes, self.reproduce_options)
        for shrink in self.shrinks:
            lines += shrink_lines(shrink)
        lines += [f"module bundle (its tests share one simulation; the replay runs them "
                  f"all): pytest --umtt-replay={path}" for path in self.module_bundles]
        return lines + self._splat_lines()

    def _splat_lines(self) -> list[str]:
        """How many splats failed tests and how many were allowed, by signature (the
        same bug in several tests is one line)."""
        failed = sum(map(len, self.splats_failed.values()))
        allowed = sum(map(len, self.splats_allowed.values()))
        if not failed and not allowed:
            return []
        tests = len({nodeid for nodeids in self.splats_failed.values() for nodeid in nodeids})
        counts = ([f"{failed} failed {tests} test{'s' if tests != 1 else ''}"] if failed else []
                  ) + ([f"{allowed} allowed"] if allowed else [])
        lines = [f"kernel splats: {', '.join(counts)}"]
        for label, table in (("failed", self.splats_failed), ("allowed", self.splats_allowed)):
            ranked = sorted(table.items(), key=lambda entry: -len(entry[1]))
            for signature, nodeids in ranked[:SIGNATURES_LISTED]:
                lines.append(f"  {label} {len(nodeids)}x {signature} (first in {nodeids[0]}"
                             f"{'' if len(set(nodeids)) == 1 else ', and others'})")
            if len(ranked) > SIGNATURES_LISTED:
                lines.append(f"  ... {len(ranked) - SIGNATURES_LISTED} more {label} signatures")
        return lines

    @staticmethod
    def _explore_lines(nodeid: str, outcomes: list[Explored], options: str) -> list[str]:
        """A test's explore row (seeds, rate and its 95% interval) and a row per failure
        signature with its seeds."""
        failed = sorted(o.seed for o in outcomes if o.failed)
        line = (f"explore: {nodeid}: {len(failed)} of {len(outcomes)} seeds failed"
                + (f" ({_seeds(failed)})" if failed else "")
                + f"; failure rate {format_rate(len(failed), len(outcomes))}")
        if failed:
            line += (f"; reproduce: pytest {shlex.quote(nodeid)} --umtt-seed={failed[0]}"
                     + options)
        return [line] + [f"  {len(seeds):3} seed{'s' if len(seeds) > 1 else ' '} "
                         f"({_seeds(seeds)}): {signature}"
                         for signature, seeds in signature_groups(outcomes)]

    def explore_report(self) -> list[dict[str, Any]]:
        """The explore summary as data (``--umtt-explore-json``): per test its runs,
        failures, rate with its 95% Wilson interval, and seeds grouped by signature."""
        report = []
        for nodeid, outcomes in self.explored.items():
            failed = [o.seed for o in outcomes if o.failed]
            low, high = wilson_interval(len(failed), len(outcomes))
            report.append({
                "nodeid": nodeid, "runs": len(outcomes), "failures": len(failed),
                "rate": len(failed) / len(outcomes) if outcomes else 0.0,
                "ci95": [low, high],
                "passed_seeds": sorted(o.seed for o in outcomes if not o.failed),
                "groups": [{"signature": signature, "seeds": seeds,
                            "reproduce": f"pytest {shlex.quote(nodeid)} --umtt-seed={seeds[0]}"
                                         + self.reproduce_options}
                           for signature, seeds in signature_groups(outcomes)]})
        return report


def shrink_lines(shrink: dict[str, Any]) -> list[str]:
    """How ``--umtt-shrink`` reduced one failing run, for the terminal."""
    head = f"shrink: {shrink['nodeid']} (seed {shrink['seed']}): {shrink['outcome']}"
    lines = [head] + [f"  {line}" for line in shrink.get("schedule", [])]
    if shrink.get("file"):
        lines.append(f"  schedule written to {shrink['file']}; replay: pytest "
                     f"{shlex.quote(shrink['nodeid'])} --umtt-schedule={shrink['file']}")
    if shrink.get("bundle"):
        lines.append(f"  replay bundle (kernel, root and schedule in one file): pytest "
                     f"--umtt-replay={shrink['bundle']}")
    if shrink.get("bundle_error"):
        lines.append(f"  bundle: {shrink['bundle_error']}")
    return lines


class SummaryReporter:
    """Fills a :class:`Summary` from reports and workers, and prints it."""

    def __init__(self, summary: Summary, *, worker: bool) -> None:
        self.summary = summary
        self.worker = worker

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker:
            return  # the controller reads the same report
        properties = dict(report.user_properties)
        if report.when == "teardown" and FINGERPRINT in properties:
            self.summary.pairs.add(report.nodeid, str(properties[FINGERPRINT]))
        if report.when == "teardown":  # it carries every phase's splats
            for name, value in report.user_properties:
                if name == SPLATS:
                    self._count_splats(report.nodeid, str(value))
        if EXPLORED_SEED in properties and (report.when == "call" or
                                            (report.when == "setup" and report.failed)):
            self.summary.explored.setdefault(base_nodeid(report.nodeid), []).append(
                Explored(int(str(properties[EXPLORED_SEED])), report.failed,
                         str(properties.get(SIGNATURE, ""))))

    def _count_splats(self, nodeid: str, recorded: str) -> None:
        for signature, reason, count in json.loads(recorded):
            table = self.summary.splats_failed if reason is None else self.summary.splats_allowed
            table.setdefault(str(signature), []).extend([nodeid] * int(count))

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        counts = getattr(node, "workeroutput", {}).get("umtt")
        if counts:
            self.summary.add_worker(counts)

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["umtt"] = {key: getattr(self.summary, key) for key in
                                    ("simulations", "virtual_ns", "wall_seconds", "shrinks",
                                     "module_bundles")}

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        lines = self.summary.lines()
        if lines:
            terminalreporter.write_sep("-", "pytest-umtt")
            for line in lines:
                terminalreporter.write_line(line)
