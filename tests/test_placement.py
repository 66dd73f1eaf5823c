"""One CPU per simulation (pytest_umtt/placement.py): which CPU, that the kernels and the
calendar's thread run there while it drives them, and that nothing else stays pinned."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil
import pytest

from pytest_umtt import Simulation, placement
from pytest_umtt.placement import (
    Placement,
    PlacementError,
    PlacementWarning,
    allowed_cpus,
    choose_cpu,
)
from tests.conftest import uml_processes

ALLOWED = allowed_cpus()


def test_unplaced_is_none_and_an_explicit_cpu_is_checked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert choose_cpu(None) is None
    assert choose_cpu(ALLOWED[-1]) == ALLOWED[-1]
    with pytest.raises(PlacementError, match=r"CPU 4096 is not one this process may use "
                                             r"\(allowed: .*\)"):
        choose_cpu(4096)


@pytest.mark.parametrize("worker", range(4))
def test_xdist_workers_take_cpus_in_turn(monkeypatch: pytest.MonkeyPatch,
                                         worker: int) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(len(ALLOWED)))
    assert choose_cpu("auto") == ALLOWED[worker % len(ALLOWED)]
    # An explicit CPU is worker 0's: the others count on from it.
    assert choose_cpu(ALLOWED[-1]) == ALLOWED[(len(ALLOWED) - 1 + worker) % len(ALLOWED)]


def test_auto_outside_xdist_takes_an_allowed_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert choose_cpu("auto") in ALLOWED


@pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: every choice is the same")
def test_more_xdist_workers_than_cpus_take_the_cpu_they_run_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")  # in turn it would take ALLOWED[1]
    monkeypatch.setattr(placement, "current_cpu", lambda: ALLOWED[0])
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(len(ALLOWED)))
    assert choose_cpu("auto") == ALLOWED[1]
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(len(ALLOWED) + 1))
    assert choose_cpu("auto") == ALLOWED[0]


needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning one CPU changes nothing")


@needs_two_cpus
def test_driving_pins_the_calling_thread_only_and_restores_it_nested() -> None:
    before = os.sched_getaffinity(0)
    placement = Placement(ALLOWED[-1])
    seen: list[set[int]] = []
    with placement.driving():
        with placement.driving():
            assert os.sched_getaffinity(0) == {ALLOWED[-1]}
            other = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            other.start()  # made while pinned: a thread inherits; the one before did not
            other.join()
        assert os.sched_getaffinity(0) == {ALLOWED[-1]}
    assert os.sched_getaffinity(0) == before
    assert seen == [{ALLOWED[-1]}]


@needs_two_cpus
def test_driving_restores_the_affinity_when_the_block_raises() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(RuntimeError), Placement(ALLOWED[0]).driving():
        raise RuntimeError("a failing run")
    assert os.sched_getaffinity(0) == before


def _affinities(directory: Path) -> set[frozenset[int]]:
    """The CPU sets of every UML process under ``directory`` and all their threads."""
    found = set()
    for proc in uml_processes(directory):
        for member in [proc, *proc.children(recursive=True)]:
            try:
                for thread in member.threads():
                    found.add(frozenset(os.sched_getaffinity(thread.id)))
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
    return found


@needs_two_cpus
@pytest.mark.kernel
def test_kernels_and_the_driving_thread_share_the_simulations_cpu(
        uml_kernel: Path, tmp_path: Path) -> None:
    before = os.sched_getaffinity(0)
    directory = tmp_path / "sim"
    with Simulation(kernel=uml_kernel, directory=directory, cpu=ALLOWED[-1]) as sim:
        cpu = sim.placement.cpu  # under pytest-xdist, worker N's is N CPUs further on
        assert cpu == choose_cpu(ALLOWED[-1])
        assert sim.calendar.spin is None  # sharing the CPU, it never spins
        machines = [sim.machine(f"m{n}", boot=False) for n in (1, 2)]
        sim.boot(*machines)
        assert os.sched_getaffinity(0) == before  # the test's own code is not pinned
        during: list[set[int]] = []

        def affinity_seen() -> bool:
            during.append(os.sched_getaffinity(0))
            return len(during) > 3
        sim.run_until(affinity_seen)
        assert during and all(cpus == {cpu} for cpus in during)
        assert _affinities(directory) == {frozenset({cpu})}
    assert os.sched_getaffinity(0) == before


@pytest.mark.kernel
def test_an_unplaced_simulation_pins_nothing(uml_kernel: Path, tmp_path: Path) -> None:
    directory = tmp_path / "sim"
    with Simulation(kernel=uml_kernel, directory=directory, cpu=None) as sim:
        assert sim.calendar.spin is not None
        sim.machine("m1")
        assert _affinities(directory) == {frozenset(ALLOWED)}


def test_a_cpu_taken_away_since_it_was_chosen_leaves_the_run_unplaced(
        monkeypatch: pytest.MonkeyPatch) -> None:
    placement = Placement(ALLOWED[0])

    def refuse(_pid: int, _cpus: object) -> None:
        raise OSError(22, "Invalid argument")
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with pytest.warns(PlacementWarning,
                      match=rf"no longer placed on CPU {ALLOWED[0]}: .*Invalid"), \
            placement.driving():
        pass
    assert placement.cpu is None


@needs_two_cpus
def test_released_gives_a_callback_its_cpus_back_for_the_block() -> None:
    before = os.sched_getaffinity(0)
    placement = Placement(ALLOWED[0])
    with placement.released():
        assert os.sched_getaffinity(0) == before  # not driving: nothing to give back
    with placement.driving():
        with placement.released():
            assert os.sched_getaffinity(0) == before
        assert os.sched_getaffinity(0) == {ALLOWED[0]}
    assert os.sched_getaffinity(0) == before
