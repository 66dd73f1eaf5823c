"""Property-based tests: random multi-client workloads keep the invariants of §3.

Each reference client runs in its own thread, sleeping a random list of intervals and
free-running below its horizon like a kernel. Every wake-up is logged, in host order,
into one list: since at most one client runs at a time and none may run past another's
pending event, that host-ordered list must be sorted by virtual time. A free_until that
is too late anywhere (§6c, §6d) breaks it.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_umtt import StallError
from pytest_umtt.controller import Calendar, StopReason, Trace, WallBudget
from pytest_umtt.errors import WallBudgetError
from pytest_umtt.wire import Op
from tests.refclient import RefClient

# Small values make ties (and ties with horizons) frequent.
intervals = st.lists(st.sampled_from([0, 1, 2, 50, 100, 256, 1000, 10_000]), min_size=1,
                     max_size=8)
workloads = st.lists(intervals, min_size=1, max_size=5)
# Per client: does it take the offered memory (§7.4), does it publish its clock after
# each sleep (as a virtio kick does, time.c:296-313)?
manners = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=5, max_size=5)


class LoggingClient(RefClient):
    """A reference client that logs every wake-up into a shared, locked list."""

    def __init__(self, sock: socket.socket, log: list[tuple[int, int]], lock: threading.Lock,
                 index: int, *, take_shm: bool = True, publish: bool = False) -> None:
        super().__init__(sock, take_shm=take_shm)
        self.log, self.lock, self.index, self.publish = log, lock, index, publish

    def sleep(self, delta: int) -> None:
        super().sleep(delta)
        if self.publish:
            self.propagate()
        with self.lock:
            self.log.append((self.time, self.index))


def run_workload(workload: list[list[int]], shm: bool,
                 manner: list[tuple[bool, bool]] | None = None,
                 ) -> tuple[list[tuple[int, int]], list[list[int]], Calendar]:
    trace = Trace()
    calendar = Calendar(shm=shm, expected_clients=len(workload), trace=trace,
                        pause_on_broadcast=False)
    log: list[tuple[int, int]] = []
    lock = threading.Lock()
    results: list[list[int]] = [[] for _ in workload]
    threads = []
    for index, sleeps in enumerate(workload):
        ours, theirs = socket.socketpair()
        calendar.attach(ours)
        take_shm, publish = manner[index] if manner else (True, False)
        client = LoggingClient(theirs, log, lock, index, take_shm=take_shm, publish=publish)

        def body(client: LoggingClient = client, sleeps: list[int] = sleeps,
                 index: int = index) -> None:
            results[index] = client.run_sleeps(index + 1, sleeps)

        threads.append(threading.Thread(target=body, daemon=True))
    for thread in threads:
        thread.start()
    while calendar.live_clients():
        stop = calendar.run_until(stall_timeout=10)
        assert stop.reason is StopReason.QUIESCENT
        if calendar.live_clients():
            calendar.serve_until(lambda: False, wall_timeout=0.01)
    for thread in threads:
        thread.join(timeout=10)
    return log, results, calendar


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads, shm=st.booleans(), manner=manners)
def test_random_workloads_keep_the_invariants(workload: list[list[int]], shm: bool,
                                              manner: list[tuple[bool, bool]]) -> None:
    log, results, calendar = run_workload(workload, shm, manner)
    try:
        assert not calendar.errors
        # Exactness: each client wakes at exactly the sums of its sleeps.
        for sleeps, woke in zip(workload, results, strict=True):
            expected, now = [], 0
            for delta in sleeps:
                now += delta
                expected.append(now)
            assert woke == expected
        # Causality: wake-ups happened, in host order, in virtual-time order.
        times = [time for time, _ in log]
        assert times == sorted(times), log
        # Monotonic clock and one runner at a time, as the calendar saw it.
        trace = calendar.trace
        assert trace is not None
        nows = [event.now for event in trace]
        assert nows == sorted(nows)
        running = None
        for event in trace:
            if event.kind == "run":
                assert running is None, f"{event.client} runs while {running} runs"
                running = event.client
            elif ((event.kind == "rx" and event.op == Op.WAIT.name) or event.kind == "drop") \
                    and event.client == running:
                running = None
    finally:
        calendar.close()


def test_silent_shm_runner_is_probed_and_a_spinning_one_stalls() -> None:
    """Half the stall budget of silence lowers free_until: a working client yields at
    its next time step (no error); one that takes no time steps raises StallError."""
    with Calendar(trace=Trace()) as calendar:
        ours, theirs = socket.socketpair()
        calendar.attach(ours)
        worker = RefClient(theirs)

        def work() -> None:
            worker.start(1)
            worker.request(1000)
            worker.wait()
            shm = worker.shm
            assert shm is not None
            while shm.free_until > worker.time:  # "time steps" until the probe lands
                threading.Event().wait(0.01)
            worker.request(2000)
            worker.send(Op.WAIT, 2**64 - 1)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        assert calendar.serve_until(lambda: calendar.starts_seen == 1, wall_timeout=5)
        stop = calendar.run_until(lambda: calendar.now >= 2000, stall_timeout=1.0)
        assert stop.reason is StopReason.CONDITION
        assert calendar.trace is not None and calendar.trace.of_kind("probe")
        thread.join(timeout=5)
        # Now a client that never yields: the watchdog fires after the full budget.
        stalled = False
        try:
            calendar.run_until(stall_timeout=1.0)
        except StallError as exc:
            stalled = "stalled at 0.000002000 s" in str(exc)
        assert stalled
        worker.close()


def test_a_creeping_shm_runner_ends_at_its_wall_budget() -> None:
    """Like cpu_relax() under time travel: a time step every wall ms, the clock shared
    with nobody. Only the stall probes let the calendar see it move, so it is never a
    stall; its deadline is far off; the wall budget ends the run."""
    with Calendar(trace=Trace()) as calendar:
        ours, theirs = socket.socketpair()
        calendar.attach(ours, label="creeper")
        creeper = RefClient(theirs)
        stop = threading.Event()

        def creep() -> None:
            creeper.start(1)
            creeper.request(1000)
            creeper.wait()
            try:
                while not stop.wait(0.001):
                    creeper.sleep(1000)
            except EOFError:
                pass  # the calendar closed

        thread = threading.Thread(target=creep, daemon=True)
        thread.start()
        assert calendar.serve_until(lambda: calendar.starts_seen == 1, wall_timeout=5)
        began, started = calendar.now, time.monotonic()
        with pytest.raises(WallBudgetError, match=(
                r"virtual time advanced 0\.00\d s in 1\.\d s of wall time \(\d+x slower than "
                r"real time\): the kernel is spinning \(a soft lockup\?\), to 0\.\d{9} s "
                r"\(running: creeper\)")) as crept:
            calendar.run_until(deadline_ns=10**9, stall_timeout=1.0,
                               wall_budget=WallBudget(began, started, 1.5, 0.1))
        assert 0 < crept.value.advanced_ns == crept.value.now_ns - began < 10**9
        assert calendar.trace is not None and calendar.trace.of_kind("probe")
        stop.set()
    thread.join(timeout=5)
    creeper.close()
