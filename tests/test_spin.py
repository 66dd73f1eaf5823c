"""The calendar's spin decision (controller/spin.py): when it spins for a kernel's WAIT,
and that spinning changes nothing in a run, with reference clients and real kernels."""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from pytest_umtt import Simulation
from pytest_umtt.controller import Calendar, Trace
from pytest_umtt.controller.spin import DEFAULT_SPIN_CAP, SpinPolicy
from pytest_umtt.rootfs import Rootfs
from tests.refclient import RefClient


def test_no_spin_before_a_short_run_was_measured() -> None:
    assert SpinPolicy(cpus=2).budget() == 0.0


def test_spins_twice_the_average_short_run() -> None:
    policy = SpinPolicy(cap=100e-6, cpus=2)
    for _ in range(20):
        policy.ran(30e-6)
    assert policy.budget() == pytest.approx(60e-6)


def test_stops_spinning_when_short_runs_grow_past_the_cap_and_starts_again() -> None:
    policy = SpinPolicy(cap=100e-6, cpus=2)
    policy.ran(20e-6)
    assert policy.budget() > 0
    for _ in range(40):  # a loaded host: the same runs take far longer in wall time
        policy.ran(500e-6)
    assert policy.budget() == 0.0
    for _ in range(80):
        policy.ran(20e-6)
    assert policy.budget() == pytest.approx(40e-6, rel=0.05)


def test_never_spins_with_a_zero_cap_or_one_cpu() -> None:
    for policy in (SpinPolicy(cap=0.0, cpus=2), SpinPolicy(cap=DEFAULT_SPIN_CAP, cpus=1)):
        policy.ran(1e-6)
        assert policy.budget() == 0.0


def test_a_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError, match="spin cap"):
        SpinPolicy(cap=-1.0)


def _lockstep_client(path: str, client_id: int) -> None:
    RefClient.connect(path).run_sleeps(client_id, [1000] * 300)


def _lockstep_run(tmp_path: Path, spin: SpinPolicy | None) -> tuple[list[str], dict[str, float]]:
    """Two shared-memory clients that wake at the same instants: every run is a tie
    that ends at its first time step."""
    with Calendar(expected_clients=2, pause_on_broadcast=False, trace=Trace(),
                  spin=spin) as calendar:
        path = str(calendar.listen(tmp_path / f"time-{spin is not None}.sock"))
        context = multiprocessing.get_context("fork")
        procs = [context.Process(target=_lockstep_client, args=(path, n)) for n in (1, 2)]
        for proc in procs:
            proc.start()
        try:
            assert calendar.serve_until(lambda: calendar.starts_seen == 2, wall_timeout=30)
            while calendar.live_clients():
                calendar.run_until(stall_timeout=30)
                calendar.serve_until(lambda: not calendar.live_clients(), wall_timeout=0.01)
        finally:
            for proc in procs:
                proc.join(timeout=30)
        assert calendar.trace is not None
        events = sorted(calendar.trace, key=lambda e: (e.now, e.client, e.kind))
        return [json.dumps(asdict(e), sort_keys=True) for e in events], calendar.reactor_stats()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="spinning needs two CPUs")
def test_spinning_calendar_serves_ties_by_spinning_and_the_run_is_the_same(
        tmp_path: Path) -> None:
    spinning, stats = _lockstep_run(tmp_path, SpinPolicy(cap=1.0))
    sleeping, quiet_stats = _lockstep_run(tmp_path, None)
    assert stats["spun"] > 0
    assert quiet_stats["spun"] == 0
    assert spinning == sleeping


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="spinning needs two CPUs")
def test_real_kernels_in_lockstep_run_the_same_spinning_or_not(uml_kernel: Path,
                                                               rootfs: Rootfs) -> None:
    loop = "mkfifo /tmp/f; for i in $(seq 20); do read -t 0.001 <> /tmp/f; done; true"
    fingerprints = []
    for cap in (1.0, 0.0):
        # Unplaced: a calendar that shares its CPU with the kernels never spins.
        with Simulation(kernel=uml_kernel, seed=7, rootfs=rootfs, cpu=None) as sim:
            sim.calendar.spin = SpinPolicy(cap=cap)
            machines = [sim.machine(f"m{n}", boot=False) for n in (1, 2)]
            sim.boot(*machines)
            commands = [machine.start(loop) for machine in machines]
            assert all(command.wait().ok for command in commands)
            spun = sim.calendar.reactor_stats()["spun"]
            assert (spun > 0) == (cap > 0)
            fingerprints.append(sim.fingerprint())
    assert fingerprints[0] == fingerprints[1]
