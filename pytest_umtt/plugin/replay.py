"""Replay bundles in the plugin: ``--umtt-bundle`` writes one per test into the artifacts
directory, ``--umtt-replay=BUNDLE`` runs its test again from it and compares the runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from ..bundle import (
    STORE,
    SUFFIX,
    Bundle,
    RunRecord,
    changed_test_files,
    fingerprint_digest,
    open_bundle,
    package_version,
    test_files,
    write_bundle,
)
from ..cache import cache_root
from ..controller.perturb import Decision, Decisions
from ..divergence import first_divergence
from ..errors import BundleError
from ..identity import kernel_differences, kernel_record, root_differences
from ..kernel import default_kernel
from ..rootfs import MANIFEST_NAME
from ..simulation import Simulation, owned_directory
from .settings import MARKERS, Settings
from .state import STATE, SessionState, artifacts_dir, base_nodeid

RUN_SETTINGS = ("mem", "cmdline", "virtual_timeout", "wall_timeout", "perturb", "rootfs")
"""The settings besides the seed and the kernel that change a run: a bundle keeps them."""


@dataclass
class RunEnd:
    """A test's run as it ended (its call, or the setup that failed): what the bundle
    keeps and the replay compares."""

    fingerprint: list[str]
    outcome: dict[str, str]


ITEM_RUN = pytest.StashKey[RunEnd]()


@dataclass(frozen=True)
class BundleRequest:
    """A bundle asked for by name rather than by ``--umtt-bundle``: a shrink's last rerun
    writes one that replays its minimal schedule."""

    target: Path
    store: Path
    schedule: tuple[Decision, ...]


BUNDLE_REQUEST = pytest.StashKey[BundleRequest]()


@dataclass
class Replay:
    """A ``--umtt-replay`` session: the bundle, where it was unpacked, and the verdict."""

    bundle: Bundle
    directory: Path
    changed: list[str]
    keep: frozenset[str] | None = None
    """The decisions the bundle's run kept, if it was a shrunk schedule's run."""
    verdict: list[str] = field(default_factory=list)


# --- recording a run and writing its bundle ----------------------------------------------

def record_run(item: pytest.Item, sim: Simulation, report: pytest.TestReport,
               call: pytest.CallInfo[None]) -> RunEnd | None:
    """At the end of a test's call (or of a setup that failed): its fingerprint and
    outcome, kept for the bundle and compared by a replay."""
    if not (report.when == "call" or (report.when == "setup" and report.failed)):
        return None
    outcome: dict[str, str] = {"outcome": report.outcome, "when": report.when}
    if call.excinfo is not None:
        message = str(call.excinfo.value).strip().split("\n", 1)[0]
        outcome["error"] = f"{call.excinfo.typename}: {message}"[:500]
    run = RunEnd(sim.fingerprint(), outcome)
    item.stash[ITEM_RUN] = run
    return run


def bundle_path(settings: Settings, nodeid: str) -> Path | None:
    """Where a test's bundle goes (inside its artifacts directory), if it gets one."""
    directory = artifacts_dir(settings, nodeid)
    if directory is None or settings.bundle == "never":
        return None
    return directory / f"{directory.name}{SUFFIX}"


def wants_bundle(settings: Settings, run: RunEnd | None) -> bool:
    return run is not None and (settings.bundle == "always" or
                                (settings.bundle == "failed" and
                                 run.outcome["outcome"] == "failed"))


def write_item_bundle(item: pytest.Item | pytest.Module, sim: Simulation,
                      settings: Settings) -> Path | None:
    """After the test's simulation closed: its bundle, if ``--umtt-bundle`` (or a shrink)
    asks for one."""
    run = item.stash.get(ITEM_RUN, None)
    request = item.stash.get(BUNDLE_REQUEST, None)
    machines = list(sim.machines.values())
    kernel = machines[0].kernel if machines else settings.kernel
    if request is None:
        target = bundle_path(settings, item.nodeid)
        if target is None or not wants_bundle(settings, run):
            return None
        assert settings.artifacts is not None
        request = BundleRequest(target, settings.artifacts / STORE, ())
    if run is None or kernel is None:
        return None
    record = RunRecord(
        nodeid=base_nodeid(item.nodeid), seed=settings.seed,
        settings={name: _plain(getattr(settings, name)) for name in RUN_SETTINGS},
        markers=_markers(item), kernel=kernel, rootfs=sim.rootfs, shim=sim.shim,
        test_files=_test_files(item), fingerprint=run.fingerprint, outcome=run.outcome,
        machines={m.name: {"mem": m.mem, "cmdline": m.cmdline,
                           "kernel": kernel_record(m.kernel)["sha256"]} for m in machines},
        schedule=[d.to_json() for d in request.schedule]
        if BUNDLE_REQUEST in item.stash else None)
    try:
        written = write_bundle(record, request.target, store=request.store)
    except OSError as exc:
        raise BundleError(f"cannot write the replay bundle {request.target}: "
                          f"{exc.strerror or exc}") from None
    if isinstance(item, pytest.Item):
        item.user_properties.append((BUNDLE_PROPERTY, str(written)))  # for CI (JUnit XML)
    return written


@dataclass
class ModuleRun:
    """The tests that share a module's simulation (``uml_module``), and which failed: a
    failure among them depends on every test before it, so the module is the unit a
    bundle replays."""

    tests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


MODULE_RUN = pytest.StashKey[ModuleRun]()
"""On a module whose tests share a simulation."""


def note_module_test(item: pytest.Item, report: pytest.TestReport) -> None:
    """Count a test that used its module's simulation, and its failure."""
    module = item.getparent(pytest.Module)
    run = None if module is None else module.stash.get(MODULE_RUN, None)
    if run is None or "umtt_module_sim" not in getattr(item, "fixturenames", ()):
        return
    if report.when == "setup" and item.nodeid not in run.tests:
        run.tests.append(item.nodeid)
    if report.failed and item.nodeid not in run.failed:
        run.failed.append(item.nodeid)


def finish_module_run(module: pytest.Module, sim: Simulation, settings: Settings) -> None:
    """After a module's simulation closed: compare it with the bundle being replayed, or
    write its bundle if ``--umtt-bundle`` asks for one."""
    run = module.stash.get(MODULE_RUN, None)
    if run is None:
        return
    failed = f"{len(run.failed)} of {len(run.tests)} tests failed"
    outcome = {"outcome": "failed" if run.failed else "passed", "when": "module",
               **({"error": f"{failed}: {', '.join(run.failed)}"[:500]} if run.failed else {})}
    end = RunEnd(sim.fingerprint(), outcome)
    state = module.config.stash[STATE]
    if state.replay is not None:
        compare_replay(state, module.nodeid, end)
        return
    module.stash[ITEM_RUN] = end
    written = write_item_bundle(module, sim, settings)
    if written is not None:
        state.summary.module_bundles.append(str(written))


BUNDLE_PROPERTY = "umtt_bundle"
"""User property (and JUnit XML property): the test's replay bundle."""


def _plain(value: object) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _markers(item: pytest.Item | pytest.Module) -> dict[str, Any]:
    """The pytest-umtt markers on the test, as written (for a person reading the bundle)."""
    found = {}
    for name in MARKERS:
        marker = item.get_closest_marker(name)
        if marker is not None:
            found[name] = {"args": [repr(a) for a in marker.args],
                           "kwargs": {k: repr(v) for k, v in marker.kwargs.items()}}
    return found


def _test_files(item: pytest.Item | pytest.Module) -> dict[str, Path]:
    rootdir = item.config.rootpath
    if rootdir not in item.path.parents:
        return {item.path.name: item.path}
    return test_files(item.path, rootdir)


# --- replaying ---------------------------------------------------------------------------

def start_replay(config: pytest.Config, state: SessionState) -> None:
    """Unpack and check the bundle; the session then runs its test with its kernel,
    root, shim, seed and settings (never the cache's), and nothing else."""
    assert state.settings.replay is not None
    directory = owned_directory()
    try:
        bundle = open_bundle(state.settings.replay, directory)
        state.settings = replayed_settings(bundle, state.settings)
        keep = _kept_decisions(bundle)
    except BundleError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise pytest.UsageError(f"--umtt-replay: {exc}") from None
    state.rootfs, state.shim = bundle.rootfs, bundle.shim
    state.replay = Replay(bundle, directory, changed_test_files(bundle, config.rootpath),
                          keep)
    test = config.rootpath / bundle.nodeid.split("::", 1)[0]
    if not test.is_file():
        finish_replay(state)
        raise pytest.UsageError(
            f"--umtt-replay: the bundle's test {bundle.nodeid} is not under {config.rootpath}: "
            f"run pytest in the project's directory (the bundle holds the file as it was: "
            f"`umtt-bundle show {bundle.path}`)")
    config.args = [str(config.rootpath / bundle.nodeid)]


def _kept_decisions(bundle: Bundle) -> frozenset[str] | None:
    """The keys of a shrunk schedule's decisions, each checked to be one."""
    if bundle.schedule is None:
        return None
    try:
        return frozenset(Decision.from_json(entry).key for entry in bundle.schedule)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{bundle.path}: the manifest's schedule is not a list of "
                          f"decisions ({exc!r})") from None


def replayed_decisions(state: SessionState, nodeid: str) -> Decisions | None:
    """The decision policy a replay runs its test with: the bundle's schedule (every
    other decision reverted), or every decision its seed makes."""
    replay: Replay | None = state.replay
    if replay is None or replay.keep is None or base_nodeid(nodeid) != replay.bundle.nodeid:
        return None
    return Decisions(replay.keep)


def replayed_settings(bundle: Bundle, base: Settings) -> Settings:
    """The session's settings with everything that changes the run taken from the bundle."""
    recorded = bundle.settings
    try:
        values = {name: recorded[name] for name in RUN_SETTINGS}
        values["cmdline"] = tuple(str(arg) for arg in values["cmdline"])
        values["virtual_timeout"] = float(values["virtual_timeout"])
        values["wall_timeout"] = float(values["wall_timeout"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.path}: the manifest's settings are incomplete or wrong "
                          f"({exc!r})") from None
    return replace(base, **values, kernel=bundle.kernel, seed=bundle.seed,
                   seed_source=f"from the bundle {bundle.path.name}", explore=0,
                   check_determinism=False, kunit=None, kselftest=None, bundle="never")


def finish_replay(state: SessionState) -> None:
    if state.replay is not None:
        shutil.rmtree(state.replay.directory, ignore_errors=True)


def replay_header(state: SessionState) -> list[str]:
    """What is replayed, and how this machine's own kernel and root differ from the
    bundle's (the replay uses the bundle's either way)."""
    replay: Replay = state.replay
    manifest = replay.bundle.manifest
    lines = [f"umtt: replaying {replay.bundle.path}: {manifest['nodeid']}, seed "
             f"{manifest['seed']}, written by pytest-umtt {manifest['pytest_umtt']}"]
    if replay.keep is not None:
        lines.append(f"umtt: a shrunk schedule: the run keeps {len(replay.keep)} perturbed "
                     f"decision{'' if len(replay.keep) == 1 else 's'} and reverts every other")
    local = default_kernel()
    if local is not None:
        differences = kernel_differences(manifest["kernel"], kernel_record(local))
        lines.append("umtt: this machine's default kernel is the bundle's" if not differences
                     else "umtt: this machine's default kernel is another one (the bundle's "
                     "is used): " + "; ".join(differences).replace("(here)", "(this machine)")
                     .replace("(expected)", "(bundle)"))
    if manifest.get("root") is None:
        lines.append("umtt: WARNING: the bundle's run used its host's / through hostfs "
                     "(--umtt-rootfs=host), which no bundle carries: this replay uses this "
                     "machine's /, and a difference in its userspace can change the run")
    root = _cached_root()
    if root is not None and manifest.get("root") is not None:
        differences = root_differences(manifest["root"], root)
        if differences:
            lines.append("umtt: this machine's cached guest root is another one (the "
                         "bundle's is used): " + "; ".join(differences)
                         .replace("(here)", "(this machine)").replace("(expected)", "(bundle)"))
    lines += [f"umtt: WARNING: {change}" for change in replay.changed]
    return lines


def _cached_root() -> dict[str, Any] | None:
    """The newest pinned root in this machine's cache, if any (nothing is built)."""
    manifests = sorted((cache_root() / "rootfs").glob(f"*/{MANIFEST_NAME}"),
                       key=lambda path: path.stat().st_mtime)
    try:
        return dict(json.loads(manifests[-1].read_text())) if manifests else None
    except (OSError, ValueError):
        return None


def compare_replay(state: SessionState, nodeid: str, run: RunEnd) -> list[str]:
    """The verdict: the same run as the bundle's, or where the two part."""
    replay: Replay = state.replay
    bundle = replay.bundle
    if base_nodeid(nodeid) != bundle.nodeid:
        return []
    recorded = bundle.manifest["outcome"]
    lines = [f"outcome: {_outcome(run.outcome)} (the bundle: {_outcome(recorded)})"]
    if bundle.manifest["pytest_umtt"] != package_version():
        lines.append(f"the bundle was written by pytest-umtt {bundle.manifest['pytest_umtt']}, "
                     f"this is {package_version()}")
    lines += replay.changed
    digest = fingerprint_digest(run.fingerprint)
    if digest == bundle.fingerprint_sha256:
        lines.append(f"reproduced: same run (fingerprint {digest[:16]}, "
                     f"{len(run.fingerprint)} items)")
    else:
        divergence = first_divergence(bundle.fingerprint, run.fingerprint,
                                      labels=("in the bundle", "in this replay"))
        lines += [str(divergence), f"not reproduced: the run differed from the bundle's "
                  f"(fingerprint {digest[:16]} here, {bundle.fingerprint_sha256[:16]} in the "
                  f"bundle)"]
    replay.verdict = lines
    return lines


def _outcome(outcome: dict[str, str]) -> str:
    text = f"{outcome.get('outcome')} in {outcome.get('when')}"
    return text + (f": {outcome['error']}" if outcome.get("error") else "")


def replay_summary(state: SessionState, terminal: Any) -> None:
    """The session ends with the verdict."""
    replay: Replay | None = state.replay
    if replay is None:
        return
    terminal.write_sep("-", "pytest-umtt replay")
    for line in replay.verdict or [f"no simulation ran for the bundle's test "
                                   f"{replay.bundle.nodeid}: nothing to compare"]:
        terminal.write_line(line)


class ReplayReporter:
    """Registered as a plugin for a replay session: its summary comes last."""

    def __init__(self, state: SessionState) -> None:
        self.state = state

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        replay_summary(self.state, terminalreporter)
