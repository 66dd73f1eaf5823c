"""Shared fixtures for pytest-umtt's own tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from pytest_umtt import Machine, Simulation
from pytest_umtt.cache import cache_root
from pytest_umtt.controller import Calendar, Client, Trace
from pytest_umtt.kernel import build_shim, default_kernel
from pytest_umtt.rootfs import Rootfs, build_rootfs
from tests.refclient import RefClient

Connect = Callable[..., tuple[Client, RefClient]]

REAL_CACHE = cache_root()
"""The cache with the built kernel, shim and root, looked up before pytester moves HOME."""


def settle(calendar: Calendar) -> None:
    """Do everything the calendar can do without waiting for a client."""
    while calendar.step(0):
        pass


@pytest.fixture
def calendar() -> Iterator[Calendar]:
    with Calendar(trace=Trace()) as cal:
        yield cal


@pytest.fixture
def connect(calendar: Calendar) -> Iterator[Connect]:
    """Make reference clients on socketpairs served by ``calendar``."""
    made: list[RefClient] = []

    def make(cal: Calendar = calendar, label: str | None = None) -> tuple[Client, RefClient]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ref = RefClient(theirs, timeout=5.0)
        ref.after_reply = lambda: settle(cal)
        made.append(ref)
        return cal.attach(ours, label), ref

    yield make
    for ref in made:
        ref.close()


@pytest.fixture(scope="session")
def rootfs() -> Rootfs:
    """The pinned guest root (built once, cached)."""
    return build_rootfs()


@pytest.fixture(scope="session")
def uml_kernel() -> Path:
    """A time-travel UML kernel: $UMTT_KERNEL, else the one umtt-kernel build made.

    Without one the test is skipped, unless UMTT_REQUIRE_KERNEL is set (CI sets it),
    in which case it fails.
    """
    explicit = os.environ.get("UMTT_KERNEL")
    path = Path(explicit) if explicit else default_kernel()
    if path is None or not path.is_file():
        message = "no time-travel UML kernel: run `umtt-kernel build` or set UMTT_KERNEL"
        if os.environ.get("UMTT_REQUIRE_KERNEL"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shim() -> Path:
    path = build_shim()
    assert path is not None, "the getrandom shim needs a C compiler"
    return path


@pytest.fixture
def real_cache(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Child pytest runs (pytester) use the real cache, not one under pytester's HOME."""
    monkeypatch.setenv("UMTT_CACHE_DIR", str(REAL_CACHE))
    return REAL_CACHE


@pytest.fixture
def kernel_args(uml_kernel: Path, real_cache: Path) -> list[str]:
    """Arguments for a child pytest run on the real kernel."""
    return [f"--uml-kernel={uml_kernel}", "-p", "no:cacheprovider"]


def uml_processes(directory: Path) -> list[psutil.Process]:
    """UML processes whose working directory is inside ``directory``."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "linux" and proc.cwd().startswith(str(directory)):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def sim(uml_kernel: Path, tmp_path: Path) -> Iterator[Simulation]:
    """A simulation on the real kernel in ``tmp_path``; nothing of it may outlive it."""
    directory = tmp_path / "sim"
    with Simulation(kernel=uml_kernel, directory=directory) as simulation:
        yield simulation
    assert not uml_processes(directory), "UML processes outlived the simulation"
    assert not (directory / "time.sock").exists()


@pytest.fixture
def machine(sim: Simulation) -> Machine:
    """One booted machine (the host's root) on ``sim``."""
    return sim.machine("alpha")
