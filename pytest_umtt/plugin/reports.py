"""What pytest shows: the header, failure sections, the reproduce text."""

from __future__ import annotations

import shlex
from collections.abc import Generator

import pytest

from ..errors import KernelError, MachineError, format_ns
from ..identity import root_summary
from ..kernel import build_shim, kernel_identity
from ..placement import choose_cpu
from ..simulation import (
    Simulation,
)
from ..uml.confine import confinement_problem
from ..uml.machine import CommandResult
from .replay import bundle_path, compare_replay, note_module_test, record_run, replay_header
from .settings import CONSOLE_TAIL, PROTOCOL_TAIL, Settings
from .state import ITEM_SIM, STATE, SessionState, artifacts_dir, settings_of
from .triage import reproduce_command


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
    shim = state.shim or build_shim()
    entropy = ("seeded by the getrandom shim" if shim is not None else
               "NOT deterministic: no C compiler to build the getrandom shim")
    replay = replay_header(state) if state.replay is not None else []
    return [*replay, f"umtt: kernel {kernel}", f"umtt: guest root {_root_description(state)}",
            f"umtt: seed {settings.seed} ({settings.seed_source}), guest entropy {entropy}",
            f"umtt: machines {_confinement_description(settings)}",
            f"umtt: placement {_placement_description(settings)}"]


def _placement_description(settings: Settings) -> str:
    if settings.cpu is None:
        return "off (--umtt-cpu=off): kernels and calendar spread by the host scheduler"
    return (f"one CPU per simulation for its kernels and calendar (--umtt-cpu={settings.cpu}: "
            f"CPU {choose_cpu(settings.cpu)} here)")


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
    return f"{rootfs.identity} ({root_summary(rootfs.packages)})\n      {rootfs.image}"



@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    note_module_test(item, report)
    sim = item.stash.get(ITEM_SIM, None)
    if sim is None:
        return report
    run = record_run(item, sim, report, call)
    state = item.config.stash[STATE]
    if run is not None and state.replay is not None:
        report.sections.append(("umtt replay", "\n".join(
            compare_replay(state, item.nodeid, run))))
    if report.failed and report.when != "teardown":
        _add_failure_sections(item, sim, report, call)
    return report


def _add_failure_sections(item: pytest.Item, sim: Simulation, report: pytest.TestReport,
                          call: pytest.CallInfo[None]) -> None:
    """What the test did, always; the boot log and the protocol's last events when a
    machine is in trouble (a crash, a stall, a timeout) or with -v."""
    troubled = ((call.excinfo is not None and isinstance(call.excinfo.value, MachineError))
                or any(m.error is not None for m in sim.machines.values()))
    if troubled or item.config.get_verbosity() > 0:
        _add_machine_sections(sim, report)
    report.sections.append(("umtt what the test did", what_the_test_did(sim)))
    settings = settings_of(item)
    report.sections.append(("umtt reproduce", reproduce_text(item.nodeid, settings, sim)))


def _add_machine_sections(sim: Simulation, report: pytest.TestReport) -> None:
    for name, machine in sim.machines.items():
        report.sections.append((f"umtt console: {name} ({machine.console_log()})",
                                machine.console_tail(CONSOLE_TAIL)))
    if sim.calendar.trace is not None:
        events = sim.calendar.trace.events[-PROTOCOL_TAIL:]
        report.sections.append(("umtt protocol (last events)", "\n".join(
            f"{format_ns(e.now)} {e.kind:5} {e.client} {e.op}({e.time}) {e.detail}".rstrip()
            for e in events)))


OUTPUT_LINES = 3
"""Lines of a command's stdout or stderr the report shows (the artifacts keep it all)."""


def what_the_test_did(sim: Simulation, limit: int = CONSOLE_TAIL) -> str:
    """The test's commands with their results and virtual times, and the console lines
    its machines printed after they booted, in order of virtual time."""
    events: list[tuple[int, int, str]] = []
    for name, machine in sim.machines.items():
        for result in machine.results:
            events.append((result.started_ns, 1, _command_line(name, result)))
        booted = machine.ready_ns if machine.ready_ns is not None else -1
        if machine.console is not None:
            # At one instant, what was printed came before a command that starts then.
            events += [(line.time_ns, 0, f"[{format_ns(line.time_ns)}] {name} console: "
                        f"{line.text}") for line in machine.console.lines
                       if line.time_ns > booted]
        if machine.ready_ns is not None:
            events.append((machine.ready_ns, -1, f"[{format_ns(machine.ready_ns)}] {name} "
                           f"booted (its boot log: {machine.console_log()})"))
    events.sort(key=lambda event: event[:2])
    lines = [text for _, _, text in events]
    if len(lines) > limit:
        lines = [f"... {len(lines) - limit} earlier lines (all of them: -v, or "
                 f"--umtt-artifacts)", *lines[-limit:]]
    lines.append(f"[{format_ns(sim.now_ns)}] now")
    return "\n".join(lines)


def _command_line(machine: str, result: CommandResult) -> str:
    command, *rest = result.command.splitlines() or [""]
    text = (f"[{format_ns(result.started_ns)}] {machine} $ {command}{' ...' if rest else ''}\n"
            f"{' ' * (len(format_ns(result.started_ns)) + 3)}exit {result.status} at "
            f"{format_ns(result.ended_ns)} ({format_ns(result.ended_ns - result.started_ns)})")
    for stream, data in (("stdout", result.stdout), ("stderr", result.stderr)):
        shown = data.decode(errors="replace").splitlines()
        if shown:
            more = f" (+{len(shown) - OUTPUT_LINES} lines)" if len(shown) > OUTPUT_LINES else ""
            text += "".join(f"\n      {stream}| {line}" for line in shown[:OUTPUT_LINES]) + more
    return text


def reproduce_text(nodeid: str, settings: Settings, sim: Simulation | None = None) -> str:
    """The replay bundle, then the seed and a command that reruns this test the same way
    where the kernel and the guest root are the same, and those two by digest and source."""
    command = reproduce_command(nodeid, settings)  # with --umtt-perturb or a schedule
    bundle = settings.replay or bundle_path(settings, nodeid)
    lines = [] if bundle is None else [
        "replay bundle (kernel, root, shim, seed, settings and test files in one file):",
        f"  pytest --umtt-replay={shlex.quote(str(bundle))}"]
    if settings.replay is None:  # a replay's kernel lies in a directory that goes away
        lines += [f"seed {settings.seed} ({settings.seed_source}); with the seed alone (the "
                  f"same run where the kernel and root below are the same):", f"  {command}"]
    machines = list(sim.machines.values())[:1] if sim is not None else []
    for machine in machines:
        identity = kernel_identity(machine.kernel)
        lines.append(f"kernel {identity}, {identity.provenance}")
    if sim is not None and sim.rootfs is not None:
        lines.append(f"root {sim.rootfs.identity}, {root_summary(sim.rootfs.packages)}")
    artifacts = artifacts_dir(settings, nodeid)
    if artifacts is not None:
        lines.append(f"artifacts: {artifacts}")
    return "\n".join(lines)
