"""Fixtures: the simulation, machines, and the variant an item stands for."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from ..devices.net import Network
from ..divergence import first_divergence
from ..simulation import (
    MachineFactory,
    Simulation,
)
from ..summary import EXPLORED_SEED, FINGERPRINT
from ..uml.machine import Machine
from .names import warn_renamed
from .replay import MODULE_RUN, ModuleRun, finish_module_run, write_item_bundle
from .state import (
    CAPTURE_DIR,
    ITEM_SETTINGS,
    ITEM_SIM,
    STATE,
    SessionState,
    Variant,
    artifacts_dir,
    close_simulation,
    machine_factory,
    open_simulation,
    settings_of,
)
from .triage import record_identity, simulation_inputs


@pytest.fixture
def umtt_variant(request: pytest.FixtureRequest) -> Variant:
    """The seed or run this item stands for (``--umtt-explore``,
    ``--umtt-check-determinism``); an empty Variant otherwise."""
    return getattr(request, "param", Variant())


@pytest.fixture
def umtt_sim(request: pytest.FixtureRequest, umtt_variant: Variant) -> Iterator[Simulation]:
    """This test's simulation: the virtual clock (``now``, ``advance``, ``run_until``,
    ``elapsed``) shared by all of its machines."""
    item = request.node
    settings = settings_of(item)
    if umtt_variant.seed is not None:
        settings = replace(settings, seed=umtt_variant.seed, seed_source="--umtt-explore")
    settings, decisions = simulation_inputs(item, settings)
    item.stash[ITEM_SETTINGS] = settings
    item.user_properties.append(("umtt_seed", str(settings.seed)))
    if umtt_variant.seed is not None:
        item.user_properties.append((EXPLORED_SEED, str(umtt_variant.seed)))
    started = time.monotonic()
    sim = open_simulation(request.config, settings, decisions, coverage_for=item.nodeid)
    item.stash[ITEM_SIM] = sim
    record_identity(item, settings, sim)
    try:
        yield sim
    finally:
        item.user_properties.append(("umtt_virtual_seconds", f"{sim.now:.9f}"))
        close_simulation(request.config, sim, started, artifacts_dir(settings, item.nodeid))
    write_item_bundle(item, sim, settings)
    if umtt_variant.run is not None:
        fingerprint = sim.fingerprint()
        digest = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()
        # The summary pairs the runs by this digest, wherever (which xdist worker) each ran.
        item.user_properties.append((FINGERPRINT, digest))
        _compare_runs(request.config.stash[STATE], item.nodeid, digest, fingerprint)


def _compare_runs(state: SessionState, nodeid: str, digest: str,
                  fingerprint: list[str]) -> None:
    """The second of two runs with one seed in this process: it must be the first one
    again, or this item fails and shows where they part."""
    judged = state.summary.pairs.add(nodeid, digest, fingerprint)
    if judged is None or judged[0]:
        return
    divergence = first_divergence(judged[1], fingerprint)
    if divergence is not None:
        raise AssertionError(f"not deterministic: two runs with one seed differ; {divergence}")


@pytest.fixture
def umtt_network(request: pytest.FixtureRequest, umtt_sim: Simulation) -> Iterator[Network]:
    """A switch for this test's machines, seeded by the test's seed:
    ``uml_factory("a", devices=[umtt_network.port("a")])``. With ``--umtt-artifacts``
    each port's capture is kept as ``PORT.pcapng`` among the test's artifacts."""
    keep = settings_of(request.node).artifacts is not None
    network = Network(umtt_sim.seed, capture=umtt_sim.directory / CAPTURE_DIR if keep else None,
                      decisions=umtt_sim.decisions)
    yield network
    network.close()


@pytest.fixture
def umtt_machine_factory(request: pytest.FixtureRequest, umtt_sim: Simulation
                         ) -> MachineFactory:
    """Make machines on this test's clock: ``umtt_machine_factory("name", mem="256M")``.
    Pass ``boot=False`` to several and ``umtt_sim.boot(*machines)`` to boot them together."""
    return machine_factory(request.config, umtt_sim, settings_of(request.node))


@pytest.fixture
def umtt_machine(umtt_machine_factory: MachineFactory) -> Machine:
    """One booted UML machine, named ``uml``."""
    return umtt_machine_factory("uml")


@pytest.fixture(scope="module")
def umtt_module_sim(request: pytest.FixtureRequest) -> Iterator[Simulation]:
    """A simulation shared by every test of a module (boot once, run many)."""
    settings = request.config.stash[STATE].settings
    started = time.monotonic()
    sim = open_simulation(request.config, settings, coverage_for=request.node.nodeid)
    request.node.stash[MODULE_RUN] = ModuleRun()
    try:
        yield sim
    finally:
        close_simulation(request.config, sim, started,
                          artifacts_dir(settings, request.node.nodeid))
    finish_module_run(request.node, sim, settings)


@pytest.fixture(scope="module")
def umtt_module_machine(request: pytest.FixtureRequest, umtt_module_sim: Simulation
                        ) -> Machine:
    """One machine, named ``uml``, booted once for the whole module."""
    settings = request.config.stash[STATE].settings
    return machine_factory(request.config, umtt_module_sim, settings)("uml")


# --- the older names (plugin/names.py): each warns once per session ----------------

@pytest.fixture
def uml_factory(request: pytest.FixtureRequest, umtt_machine_factory: MachineFactory
                ) -> MachineFactory:
    """Deprecated name of ``umtt_machine_factory``."""
    warn_renamed(request.config, "fixture", "uml_factory")
    return umtt_machine_factory


@pytest.fixture
def uml(request: pytest.FixtureRequest, umtt_machine: Machine) -> Machine:
    """Deprecated name of ``umtt_machine``."""
    warn_renamed(request.config, "fixture", "uml")
    return umtt_machine


@pytest.fixture(scope="module")
def uml_module(request: pytest.FixtureRequest, umtt_module_machine: Machine) -> Machine:
    """Deprecated name of ``umtt_module_machine``."""
    warn_renamed(request.config, "fixture", "uml_module")
    return umtt_module_machine
