"""The virtio-gpio model without a kernel: a driver's side of the rings in fake guest
memory, to reach what libgpiod cannot (levels, latched edges, disabling with a buffer
queued) and to pin the response layouts."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_umtt.controller.clock import Clock
from pytest_umtt.controller.trace import Trace
from pytest_umtt.devices import VirtioGpio
from pytest_umtt.devices.gpio import EVENT_QUEUE, REQUEST, REQUEST_QUEUE
from pytest_umtt.devices.guest_memory import Region
from pytest_umtt.devices.virtqueue import DESC, DESC_F_NEXT, DESC_F_WRITE, U16, USED_ELEM, VirtQueue
from pytest_umtt.errors import DeviceNotServedError

GET_NAMES, GET_DIRECTION, SET_DIRECTION, GET_VALUE, SET_VALUE, IRQ_TYPE = range(1, 7)
RISING, LEVEL_HIGH, NONE = 1, 4, 0


class LoopbackClock(Clock):
    """The calendar's clock without a kernel: no sockets to watch, nothing to hold."""

    trace: Trace | None = None

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_reader(self, fd: int) -> None:
        pass

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        pass

    def remove_writer(self, fd: int) -> None:
        pass

    def hold(self, reason: str) -> Callable[[], None]:
        return lambda: None


class Recording(VirtioGpio):
    """Notes interrupts instead of sending them."""

    def __init__(self) -> None:
        super().__init__(["led", "button", ""])
        self.calls: list[tuple[int, int]] = []

    def interrupt(self, queue: VirtQueue, when_ns: int | None = None) -> None:
        self.calls.append((queue.index, self.now_ns))


class DriverRing:
    """The driver's side of a split ring: offer (request, reply size) chains, read used."""

    def __init__(self, queue: VirtQueue, base: int, size: int = 16) -> None:
        self.queue, self.memory, self.size = queue, queue.memory, size
        queue.size, queue.enabled = size, True
        queue.configure(desc=base, used=base + 0x400, avail=base + 0x200)
        self.data, self.offered, self.seen = base + 0x800, 0, 0

    def offer(self, out: bytes, reply: int) -> None:
        head = 2 * (self.offered % (self.size // 2))
        out_at = self.data + 64 * head
        self.memory.write(out_at, out)
        self.memory.pack(DESC, self.queue.desc + 16 * head, out_at, len(out), DESC_F_NEXT,
                         head + 1)
        self.memory.pack(DESC, self.queue.desc + 16 * (head + 1), out_at + 32, reply,
                         DESC_F_WRITE, 0)
        self.memory.pack(U16, self.queue.avail + 4 + 2 * (self.offered % self.size), head)
        self.offered += 1
        self.memory.pack(U16, self.queue.avail + 2, self.offered)

    def used(self) -> list[bytes]:
        """What the device wrote in each chain it gave back since the last look."""
        (index,) = self.memory.unpack(U16, self.queue.used + 2)
        answers = []
        while self.seen != index:
            head, length = self.memory.unpack(USED_ELEM,
                                              self.queue.used + 4 + 8 * (self.seen % self.size))
            answers.append(self.memory.read(self.data + 64 * head + 32, length))
            self.seen += 1
        return answers


class Bench:
    """A chip served on a loopback clock, with the driver's side of both rings."""

    def __init__(self, path: Path) -> None:
        self.chip = Recording()
        self.clock = LoopbackClock()
        backend = self.chip.serve(self.clock, str(path), seed=0)
        memory = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(memory, 1 << 16)
        backend.memory.regions.append(Region(0, 1 << 16, 0, memory))
        self.requests = DriverRing(self.chip.queue(REQUEST_QUEUE), 0x1000)
        self.events = DriverRing(self.chip.queue(EVENT_QUEUE), 0x4000)

    def request(self, kind: int, line: int, value: int = 0, reply: int = 2) -> bytes:
        self.requests.offer(REQUEST.pack(kind, line, value), reply)
        self.requests.queue.start_batch()  # a kick is one go of the device
        self.chip.on_kick(self.requests.queue)
        (answer,) = self.requests.used()
        return answer

    def arm(self, line: int) -> None:
        """Queue the line's eventq buffer, as the driver does on unmask."""
        self.events.offer(struct.pack("<H", line), 1)
        self.events.queue.start_batch()
        self.chip.on_kick(self.events.queue)


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    bench = Bench(tmp_path / "gpio.sock")
    yield bench
    bench.chip.close()
    bench.requests.memory.unmap()


def test_responses_have_the_layouts_the_driver_checks(bench: Bench) -> None:
    assert bench.request(GET_NAMES, 0, reply=1 + 12) == b"\0led\0button\0\0"
    assert bench.chip.config() == struct.pack("<H2xI", 3, 12)
    assert bench.request(SET_DIRECTION, 0, 1) == b"\0\0"
    assert bench.request(GET_DIRECTION, 0) == b"\0\1"
    assert bench.request(SET_VALUE, 0, 1) == b"\0\0"
    assert bench.request(GET_VALUE, 0) == b"\0\1"
    assert bench.request(GET_VALUE, 7) == b"\1\0"  # no such line
    assert bench.chip.writes == [(0, 0, 1)]


def test_an_edge_without_a_buffer_is_latched_until_the_driver_queues_one(
        bench: Bench) -> None:
    bench.request(IRQ_TYPE, 1, RISING)
    bench.chip.drive("button", 1, at_ns=500)
    bench.clock.run_until(1000)
    bench.arm(1)  # at 1000: reported at once
    assert bench.events.used() == [b"\1"]
    assert bench.chip.interrupts == [(1000, 1, 1)]
    assert (EVENT_QUEUE, 1000) in bench.chip.calls


def test_an_edge_with_a_buffer_is_reported_at_its_instant(bench: Bench) -> None:
    bench.request(IRQ_TYPE, 1, RISING)
    bench.arm(1)
    bench.chip.drive("button", 0, at_ns=200)  # no edge: it is low already
    bench.chip.drive("button", 1, at_ns=700)
    bench.clock.run_until(1000)
    assert bench.events.used() == [b"\1"]
    assert bench.chip.interrupts == [(700, 1, 1)]


def test_disabling_returns_the_queued_buffer_invalid(bench: Bench) -> None:
    bench.request(IRQ_TYPE, 1, RISING)
    bench.arm(1)
    bench.request(IRQ_TYPE, 1, NONE)
    assert bench.events.used() == [b"\0"]
    assert bench.chip.interrupts == []


def test_a_level_is_reported_whenever_a_buffer_waits_while_it_holds(bench: Bench) -> None:
    bench.chip.drive("button", 1)
    bench.request(IRQ_TYPE, 1, LEVEL_HIGH)
    bench.arm(1)
    assert bench.events.used() == [b"\1"]
    bench.arm(1)  # handled and unmasked: still high
    assert bench.events.used() == [b"\1"]


def test_a_fault_covers_its_line_and_its_window(bench: Bench) -> None:
    bench.chip.fail("button", at_ns=100, until_ns=200)
    answers = []
    for instant in (50, 100, 150, 200):
        bench.clock.run_until(instant)
        answers.append((bench.request(GET_VALUE, 1)[0], bench.request(GET_VALUE, 0)[0]))
    assert answers == [(0, 0), (1, 0), (1, 0), (0, 0)]


def test_a_device_no_machine_serves_says_so() -> None:
    chip = VirtioGpio(["led"])
    with pytest.raises(DeviceNotServedError, match="device gpio has no queue 0: no machine "
                                                   "serves it yet"):
        chip.queue(0)
    with pytest.raises(DeviceNotServedError, match="device gpio has no clock"):
        chip.call_at(1, lambda: None)
