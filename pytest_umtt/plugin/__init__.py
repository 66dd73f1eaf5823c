"""The pytest plugin: options, fixtures, markers and reports over Simulation and Machine.

Thin by design: everything here delegates to :mod:`pytest_umtt.simulation` and
:mod:`pytest_umtt.uml`, which work without pytest. This module holds the session's
hooks; :mod:`.settings` (options and markers), :mod:`.state` (what a session keeps),
:mod:`.fixtures`, :mod:`.suites` (KUnit, kselftests) and :mod:`.reports` the rest, and
pytest finds their fixtures and hooks here, where they are imported.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import replace

import pytest

from .. import hookspecs
from ..simulation import remove_stale_directories
from ..summary import SummaryReporter
from .coverage import start_coverage
from .fixtures import uml as uml
from .fixtures import uml_factory as uml_factory
from .fixtures import uml_module as uml_module
from .fixtures import umtt_machine as umtt_machine
from .fixtures import umtt_machine_factory as umtt_machine_factory
from .fixtures import umtt_module_machine as umtt_module_machine
from .fixtures import umtt_module_sim as umtt_module_sim
from .fixtures import umtt_network as umtt_network
from .fixtures import umtt_sim as umtt_sim
from .fixtures import umtt_variant as umtt_variant
from .names import OPTION_ALIASES
from .replay import ReplayReporter, finish_replay, start_replay
from .reports import pytest_report_header as pytest_report_header
from .reports import pytest_runtest_makereport as pytest_runtest_makereport
from .reports import reproduce_text as reproduce_text
from .settings import MARKERS, OPTIONS, item_settings, resolve_settings
from .splats import SplatWatcher
from .state import ITEM_SETTINGS as ITEM_SETTINGS
from .state import STATE, SessionState, Variant
from .suites import KselftestRun, KunitRun
from .suites import pytest_runtest_protocol as pytest_runtest_protocol
from .triage import TriagePlugin


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("umtt", "virtual-time UML kernels (pytest-umtt)")
    for option in OPTIONS:
        help_text = f"{option.help}; env {option.env}, ini {option.name}"
        flags = (option.flag, *OPTION_ALIASES.get(option.flag, ()))
        if option.metavar is None:
            group.addoption(*flags, dest=option.name, action="store_const", const="true",
                            help=help_text)
        elif option.const is not None:
            group.addoption(option.flag, dest=option.name, metavar=option.metavar, nargs="?",
                            const=option.const, help=help_text)
        elif option.repeated:
            group.addoption(*flags, dest=option.name, metavar=option.metavar,
                            action="append", help=help_text)
        else:
            group.addoption(*flags, dest=option.name, metavar=option.metavar,
                            help=help_text)
        if option.repeated:
            parser.addini(option.name, option.help, type="linelist")
        else:
            parser.addini(option.name, option.help)


def pytest_configure(config: pytest.Config) -> None:
    for text in MARKERS.values():
        config.addinivalue_line("markers", text)
    state = SessionState(resolve_settings(config))
    config.stash[STATE] = state
    if state.settings.coverage is not None:
        state.coverage = start_coverage(config, state.settings)
    if state.settings.replay is not None:
        start_replay(config, state)
        config.pluginmanager.register(ReplayReporter(state), "umtt-replay")
    config.pluginmanager.register(SummaryReporter(
        state.summary, worker=hasattr(config, "workerinput")),
        "umtt-summary")
    config.pluginmanager.register(SplatWatcher(), "umtt-splats")
    config.pluginmanager.register(TriagePlugin(config), "umtt-triage")
    if not hasattr(config, "workerinput"):  # xdist workers' owners are alive anyway
        remove_stale_directories()
    state.previous_sigterm = _sigterm_as_interrupt()


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None:
        return
    for sim in list(state.open):
        sim.close(polite=False)  # interrupted runs: no machine outlives the session
    finish_replay(state)
    if state.previous_sigterm is not None:
        signal.signal(signal.SIGTERM, state.previous_sigterm)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _sigterm_as_interrupt() -> signal.Handlers | None:
    """SIGTERM ends the session like Ctrl-C, so every machine is torn down (the default
    action would leave no chance to). Only where nobody else handles it already."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return None
    signal.signal(signal.SIGTERM, _interrupt)
    return signal.SIG_DFL


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    base = config.stash[STATE].settings
    for item in items:
        # A replay's settings are the bundle's, markers included.
        item.stash[ITEM_SETTINGS] = base if base.replay else item_settings(item, base)
    if base.kunit is not None:
        # First, so that -k and other deselection apply to KUnit cases too.
        items.extend(KunitRun.from_parent(session, name="kunit").collect())
    if base.kselftest is not None:
        items.extend(KselftestRun.from_parent(session, name="kselftest").collect())



def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """--umtt-explore and --umtt-check-determinism: one item per seed and per run."""
    settings = metafunc.config.stash[STATE].settings
    if "umtt_sim" not in metafunc.fixturenames:
        return
    variants = [Variant(seed=settings.seed + n) for n in range(settings.explore)] or [Variant()]
    if settings.check_determinism:
        variants = [replace(v, run=run) for v in variants for run in (1, 2)]
    if variants != [Variant()]:
        metafunc.parametrize("umtt_variant", variants, ids=[v.id for v in variants])
