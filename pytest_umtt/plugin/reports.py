"""What pytest shows: the header, failure sections, the reproduce text."""

from __future__ import annotations

import shlex
from collections.abc import Generator

import pytest

from ..errors import KernelError, format_ns
from ..kernel import build_shim, kernel_identity
from ..simulation import (
    Simulation,
)
from ..uml.confine import confinement_problem
from .settings import CONSOLE_TAIL, PROTOCOL_TAIL, Settings
from .state import ITEM_SIM, STATE, SessionState, artifacts_dir, base_nodeid, settings_of


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE]
    settings = state.settings
    if settings.kernel is None:
        kernel = "none (build one with `umtt-kernel build` or pass --uml-kernel)"
    else:
        identity = kernel_identity(settings.kernel)
        kernel = (f"{settings.kernel}\n      {identity}\n      {identity.provenance}"
                  f"\n      variant: {identity.variant}")
        if not identity.pinned:
            kernel += "\n      (version string not pinned: a rebuild changes seeded runs)"
    shim = build_shim()
    entropy = ("seeded by the getrandom shim" if shim is not None else
               "NOT deterministic: no C compiler to build the getrandom shim")
    return [f"umtt: kernel {kernel}", f"umtt: guest root {_root_description(state)}",
            f"umtt: seed {settings.seed} ({settings.seed_source}), guest entropy {entropy}",
            f"umtt: machines {_confinement_description(settings)}"]


def _confinement_description(settings: Settings) -> str:
    if not settings.confine:
        return ("NOT confined (--umtt-confine=off): a guest can write what the user running "
                "pytest can write")
    problem = confinement_problem()
    if problem is not None:
        return f"cannot be confined on this host ({problem}): tests that boot one will fail"
    return "confined to their own directories (private mount namespace, host read-only)"


def _root_description(state: SessionState) -> str:
    try:
        rootfs = state.guest_root()
    except KernelError as exc:
        return f"pinned, but it cannot be built: {exc}"
    if rootfs is None:
        return "the host's / through hostfs (runs depend on the host's userspace)"
    return f"{rootfs.identity} ({len(rootfs.packages)} Debian packages, {rootfs.image})"



@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    sim = item.stash.get(ITEM_SIM, None)
    if sim is not None and report.failed and report.when != "teardown":
        _add_failure_sections(item, sim, report)
    return report


def _add_failure_sections(item: pytest.Item, sim: Simulation, report: pytest.TestReport) -> None:
    for name, machine in sim.machines.items():
        report.sections.append((f"umtt console: {name} ({machine.console_log()})",
                                machine.console_tail(CONSOLE_TAIL)))
    if sim.calendar.trace is not None:
        events = sim.calendar.trace.events[-PROTOCOL_TAIL:]
        report.sections.append(("umtt protocol (last events)", "\n".join(
            f"{format_ns(e.now)} {e.kind:5} {e.client} {e.op}({e.time}) {e.detail}".rstrip()
            for e in events)))
    settings = settings_of(item)
    report.sections.append(("umtt reproduce", reproduce_text(item.nodeid, settings, sim)))


def reproduce_text(nodeid: str, settings: Settings, sim: Simulation | None = None) -> str:
    """The seed, a command that reruns this test the same way, and what the run's
    outcome depends on besides the seed: the kernel and the guest root, exactly."""
    command = f"pytest {shlex.quote(base_nodeid(nodeid))} --umtt-seed={settings.seed}"
    if settings.kernel is not None:
        command += f" --uml-kernel={shlex.quote(str(settings.kernel))}"
    if settings.rootfs != "pinned":
        command += f" --umtt-rootfs={settings.rootfs}"
    lines = [f"seed {settings.seed} ({settings.seed_source}); to reproduce:", f"  {command}"]
    if sim is not None:
        lines += [f"same run where {sim.identity(machine)}" for machine in
                  list(sim.machines.values())[:1]]
    artifacts = artifacts_dir(settings, nodeid)
    if artifacts is not None:
        lines.append(f"artifacts: {artifacts}")
    return "\n".join(lines)
