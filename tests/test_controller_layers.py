"""The controller's lower layers alone: the clock and the reactor without the protocol,
as a device model would use them, and the import order of the layers."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest_umtt.controller
from pytest_umtt.controller.clock import Clock
from pytest_umtt.controller.reactor import Connection, Reactor
from pytest_umtt.controller.trace import Trace, TraceEvent

LAYERS = ["trace", "clock", "shm", "reactor", "spin", "perturb", "client", "core",
          "membership", "handlers", "engine", "cli"]
"""Bottom up: each module may import only those before it."""


def controller_imports(module: str) -> set[str]:
    """The controller modules that ``module`` imports (relative imports only)."""
    path = Path(pytest_umtt.controller.__file__).parent / f"{module}.py"
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    for index, module in enumerate(LAYERS):
        assert controller_imports(module) <= set(LAYERS[:index]), module


class Device:
    """A device model: answers each request frame ``latency`` ns later, in virtual time."""

    def __init__(self, clock: Clock, latency: int) -> None:
        self.clock = clock
        self.latency = latency
        self.closed: list[Connection] = []
        self.errors: list[str] = []
        self.reactor: Reactor[Connection] = Reactor(
            on_frame=self.on_frame, on_close=self.closed.append,
            on_error=lambda _conn, detail: self.errors.append(detail),
            on_accept=lambda sock: self.reactor.attach(Connection(sock)), frame_size=4)

    def on_frame(self, conn: Connection, data: bytes) -> None:
        self.clock.call_later(self.latency, lambda: self.answer(conn, data), "answer")

    def answer(self, conn: Connection, data: bytes) -> None:
        self.reactor.send(conn, data.upper())


def test_a_device_answers_on_the_clock_through_the_reactor() -> None:
    clock = Clock()
    device = Device(clock, latency=500)
    driver, ours = socket.socketpair()
    conn = device.reactor.attach(Connection(ours))
    try:
        clock.move_to(100)
        driver.sendall(b"ping")
        assert device.reactor.pump(1.0)
        job = clock.peek()
        assert job is not None and job.time == 600
        clock.run_until(599)
        device.reactor.flush()
        driver.setblocking(False)
        assert not device.reactor.has_output
        clock.run_until(1_000)
        assert device.reactor.has_output
        device.reactor.flush()
        assert driver.recv(16) == b"PING"
        driver.close()
        device.reactor.pump(1.0)
        assert device.closed == [conn]
    finally:
        device.reactor.discard(conn)
        device.reactor.close()
        driver.close()


def test_the_reactor_bounds_a_backlog_and_reports_short_frames() -> None:
    clock = Clock()
    device = Device(clock, latency=0)
    device.reactor.max_backlog = 8
    driver, ours = socket.socketpair()
    conn = device.reactor.attach(Connection(ours))
    try:
        for _ in range(3):
            device.reactor.send(conn, b"abcd")
        assert device.errors == ["it does not read its messages (12 bytes queued for it)"]
        driver.sendall(b"ab")
        driver.shutdown(socket.SHUT_WR)
        device.reactor.pump(1.0)
        assert device.errors[-1] == "short message of 2 bytes: 6162"
    finally:
        device.reactor.discard(conn)
        device.reactor.close()
        driver.close()


def test_trace_records_cheaply_in_order_and_eagerly_for_a_subclass() -> None:
    trace = Trace()
    trace.record((1, "rx", "m1", "WAIT", 2, 3, ""))
    trace.add(TraceEvent(2, "boot", "m2"))
    trace.record((3, "tx", "m1", "RUN", 4, 3, ""))
    assert [(e.now, e.kind) for e in trace] == [(1, "rx"), (2, "boot"), (3, "tx")]
    assert trace.events[0] == TraceEvent(1, "rx", "m1", "WAIT", 2, 3, "")

    class Printing(Trace):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[TraceEvent] = []

        def add(self, event: TraceEvent) -> None:
            self.seen.append(event)

    printing = Printing()
    printing.record((5, "run", "m1", "", 0, 5, ""))
    assert printing.seen == [TraceEvent(5, "run", "m1", "", 0, 5, "")]
