"""What a session keeps (in config.stash), and opening and closing a test's simulation."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ..controller import Decisions
from ..coverage import CoverageSink
from ..devices import VirtioDevice
from ..divergence import FINGERPRINT_FILE
from ..rootfs import Rootfs, build_rootfs
from ..simulation import (
    MachineFactory,
    Simulation,
)
from ..summary import Summary, node_filename
from ..summary import Variant as Variant  # noqa: PLC0414 (the plugin's name for it)
from ..summary import base_nodeid as base_nodeid  # noqa: PLC0414
from ..uml.agent import COMMANDS_DIR
from ..uml.machine import CountsSink, Machine
from .coverage import node_sink
from .settings import Settings

# --- session state ------------------------------------------------------------------

@dataclass
class SessionState:
    """What the plugin keeps for a session (in config.stash, never in globals)."""

    settings: Settings
    summary: Summary = field(default_factory=Summary)
    open: set[Simulation] = field(default_factory=set)
    rootfs: Rootfs | None = None
    previous_sigterm: signal.Handlers | None = None
    shim: Path | None = None
    """The getrandom shim a replay bundle brought (None: the cache's, built if needed)."""
    replay: Any = None
    """The replay under way (:class:`.replay.Replay`), if ``--umtt-replay`` was given."""
    coverage: CoverageSink | None = None
    """Where machines' coverage counts go, with ``--umtt-coverage``."""

    def guest_root(self) -> Rootfs | None:
        """The pinned root filesystem (built once per session, cached across sessions),
        or None for the host's root."""
        if self.settings.rootfs == "host":
            return None
        if self.rootfs is None:
            self.rootfs = build_rootfs()
        return self.rootfs


STATE = pytest.StashKey[SessionState]()
ITEM_SIM = pytest.StashKey[Simulation]()
ITEM_SETTINGS = pytest.StashKey[Settings]()


def settings_of(item: pytest.Item) -> Settings:
    """A test's settings: its markers applied at collection, else the session's."""
    return item.stash.get(ITEM_SETTINGS, item.config.stash[STATE].settings)


def open_simulation(config: pytest.Config, settings: Settings,
                    decisions: Decisions | None = None, host_root: bool = False,
                    coverage_for: str | None = None) -> Simulation:
    """A simulation for ``settings``; with ``host_root``, its machines boot the host's root
    read-only (hostfs) instead of unpacking the pinned one: for boots whose work is done
    before userspace starts (KUnit). ``coverage_for``: the node whose counts its machines
    are, with ``--umtt-coverage-per-test``."""
    session_sink = config.stash[STATE].coverage
    coverage: CountsSink | None = session_sink
    if session_sink is not None and coverage_for is not None and settings.coverage_per_test:
        coverage = node_sink(config, settings, session_sink, coverage_for)
    sim = Simulation(kernel=settings.kernel, seed=settings.seed,
                     wall_timeout=settings.wall_timeout, perturb=settings.perturb,
                     confine=settings.confine, decisions=decisions, cpu=settings.cpu,
                     shim=config.stash[STATE].shim,
                     rootfs=None if host_root else config.stash[STATE].guest_root(),
                     coverage=coverage)
    sim.on_doorbell.append(
        lambda machine, value: config.hook.pytest_umtt_doorbell(machine=machine, value=value))
    config.stash[STATE].open.add(sim)
    return sim


def close_simulation(config: pytest.Config, sim: Simulation, started: float,
                      artifacts: Path | None) -> None:
    state = config.stash[STATE]
    state.open.discard(sim)
    state.summary.add_simulation(sim.now_ns, time.monotonic() - started)
    sim.close(keep_files=artifacts is not None)
    if artifacts is not None:
        try:
            save_artifacts(sim, artifacts)
        finally:
            shutil.rmtree(sim.directory, ignore_errors=True)


CAPTURE_DIR = "capture"
"""Where the ``umtt_network`` fixture's ports write their pcapng captures."""


def machine_factory(config: pytest.Config, sim: Simulation, settings: Settings) -> MachineFactory:
    def make(name: str | None = None, *, boot: bool = True, mem: str | None = None,
             cmdline: Sequence[str] = (), devices: Sequence[VirtioDevice] = ()) -> Machine:
        name = name or f"m{len(sim.machines) + 1}"
        hooked = [arg for args in config.hook.pytest_umtt_kernel_cmdline(name=name) or []
                  for arg in args or []]
        return sim.machine(name, boot=boot, kernel=settings.kernel, mem=mem or settings.mem,
                           cmdline=[*settings.cmdline, *hooked, *cmdline],
                           default_timeout=settings.virtual_timeout, devices=devices)
    return make


def artifacts_dir(settings: Settings, nodeid: str) -> Path | None:
    if settings.artifacts is None:
        return None
    return settings.artifacts / node_filename(nodeid)



def save_artifacts(sim: Simulation, target: Path) -> None:
    """Consoles, command records and the protocol trace of a finished simulation."""
    target.mkdir(parents=True, exist_ok=True)
    for name, machine in sim.machines.items():
        if machine.console is not None and machine.console.log_path.exists():
            shutil.copyfile(machine.console.log_path, target / f"{name}.console.log")
        commands = machine.directory / COMMANDS_DIR
        if commands.is_dir():
            # Links the guest made stay links: never copy what they point to.
            shutil.copytree(commands, target / f"{name}.commands", symlinks=True,
                            dirs_exist_ok=True)
    for capture in sorted((sim.directory / CAPTURE_DIR).glob("*.pcapng")):
        shutil.copyfile(capture, target / capture.name)
    trace = sim.calendar.trace
    if trace is not None:
        with (target / "trace.jsonl").open("w") as stream:
            trace.write_jsonl(stream)
        for name in sim.machines:
            with (target / f"{name}.trace.jsonl").open("w") as stream:
                trace.write_jsonl(stream, client=name)
    (target / FINGERPRINT_FILE).write_text("\n".join(sim.fingerprint()))
    (target / "simulation.json").write_text(json.dumps(
        {"seed": sim.seed, "virtual_ns": sim.now_ns,
         "machines": {name: sim.identity(machine) for name, machine in sim.machines.items()}},
        indent=2))
