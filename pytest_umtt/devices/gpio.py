"""virtio-gpio (virtio 1.2, "GPIO Device"): a GPIO chip whose lines a test drives and reads.

The guest sees a gpiochip (``gpiodetect``, ``gpioinfo``, ``gpioget``, ``gpioset``,
``gpiomon`` and in-kernel users all go through drivers/gpio/gpio-virtio.c). The model
behind it is plain Python: named lines with a direction and a value. A test

- drives inputs at chosen virtual instants (:meth:`VirtioGpio.drive`); an edge or level
  the driver asked for (``SET_IRQ_TYPE``) answers that line's eventq buffer and
  interrupts at exactly that instant;
- reads what the driver set on its lines (:attr:`VirtioGpio.writes`, with the instant);
- makes requests fail from a chosen instant (:meth:`VirtioGpio.fail`) to see the
  kernel's error path.

Requests are answered inside the kick, with the kernel stopped, and the interrupt is
at the kick's instant: a request costs the guest no virtual time.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from ..units import either, ns_to_seconds
from .device import VirtioDevice
from .vhost_user import Backend, DeviceClock
from .virtqueue import Chain, VirtQueue

DEVICE_ID_GPIO = 41
F_IRQ = 1 << 0  # VIRTIO_GPIO_F_IRQ
REQUEST_QUEUE = 0
EVENT_QUEUE = 1

CONFIG = struct.Struct("<H2xI")  # ngpio, padding, gpio_names_size
REQUEST = struct.Struct("<HHI")  # type, gpio, value
RESPONSE = struct.Struct("<BB")  # status, value
IRQ_REQUEST = struct.Struct("<H")  # gpio

MSG_GET_NAMES, MSG_GET_DIRECTION, MSG_SET_DIRECTION = 1, 2, 3
MSG_GET_VALUE, MSG_SET_VALUE, MSG_IRQ_TYPE = 4, 5, 6
MESSAGE_NAMES = {MSG_GET_NAMES: "GET_NAMES", MSG_GET_DIRECTION: "GET_DIRECTION",
                 MSG_SET_DIRECTION: "SET_DIRECTION", MSG_GET_VALUE: "GET_VALUE",
                 MSG_SET_VALUE: "SET_VALUE", MSG_IRQ_TYPE: "SET_IRQ_TYPE"}
STATUS_OK, STATUS_ERR = 0, 1
IRQ_STATUS_INVALID, IRQ_STATUS_VALID = 0, 1

DIRECTIONS = {0: "none", 1: "out", 2: "in"}
IRQ_NONE, IRQ_RISING, IRQ_FALLING, IRQ_BOTH = 0, 1, 2, 3
IRQ_LEVEL_HIGH, IRQ_LEVEL_LOW = 4, 8
IRQ_TYPES = {IRQ_NONE: "none", IRQ_RISING: "rising", IRQ_FALLING: "falling",
             IRQ_BOTH: "both", IRQ_LEVEL_HIGH: "high", IRQ_LEVEL_LOW: "low"}


class GpioWrite(NamedTuple):
    """The driver set ``line`` to ``value`` at virtual time ``time_ns``."""

    time_ns: int
    line: int
    value: int

    @property
    def time(self) -> float:
        """When, in virtual seconds (``time_ns`` exact)."""
        return ns_to_seconds(self.time_ns)


class GpioRequest(NamedTuple):
    """One request on the request queue as the device answered it."""

    time_ns: int
    kind: str
    line: int
    value: int
    ok: bool

    @property
    def time(self) -> float:
        """When, in virtual seconds (``time_ns`` exact)."""
        return ns_to_seconds(self.time_ns)


class GpioInterrupt(NamedTuple):
    """The device reported an event on ``line`` (now at ``value``) at ``time_ns``."""

    time_ns: int
    line: int
    value: int

    @property
    def time(self) -> float:
        """When, in virtual seconds (``time_ns`` exact)."""
        return ns_to_seconds(self.time_ns)


@dataclass
class Fault:
    """Requests naming ``line`` (every line if None) answer VIRTIO_GPIO_STATUS_ERR from
    ``start_ns`` until ``end_ns`` (for ever if None)."""

    line: int | None
    start_ns: int
    end_ns: int | None = None

    def covers(self, line: int, now: int) -> bool:
        in_time = self.start_ns <= now and (self.end_ns is None or now < self.end_ns)
        return in_time and self.line in (None, line)


@dataclass
class GpioLine:
    """One line of the model: what the driver configured and what the wire carries."""

    name: str
    value: int = 0
    direction: str = "in"
    """"in", "out" or "none" (released): what the driver last set."""
    irq_type: str = "none"
    """"none", "rising", "falling", "both", "high" or "low"."""
    event_buffer: Chain | None = field(default=None, repr=False)
    """The eventq buffer the driver queued for this line, until an event answers it."""
    latched: bool = False
    """An edge came while the driver had no buffer queued: it is reported with the next."""


class VirtioGpio(VirtioDevice):
    """A GPIO chip on the virtual clock.

    ``lines`` names the lines (``""`` for an unnamed one) or gives their number.
    Lines start as inputs at 0; :meth:`drive` changes what an input reads.
    """

    device_id = DEVICE_ID_GPIO
    num_queues = 2

    def __init__(self, lines: Iterable[str] | int = 8, name: str = "gpio",
                 irq: bool = True) -> None:
        super().__init__(name)
        names = [""] * lines if isinstance(lines, int) else list(lines)
        if not names:
            raise ValueError("a GPIO chip needs at least one line")
        self.lines = [GpioLine(line_name) for line_name in names]
        self.features = F_IRQ if irq else 0
        self.writes: list[GpioWrite] = []
        """Every value the driver set (SET_VALUE), in order, with its instant."""
        self.requests: list[GpioRequest] = []
        """Every request the driver made, with its instant and whether it succeeded."""
        self.interrupts: list[GpioInterrupt] = []
        """Every event reported to the driver, with its instant."""
        self.faults: list[Fault] = []
        self._drives: list[tuple[int, int, int]] = []  # asked before the clock was known

    # --- the test's side ------------------------------------------------------------

    def offset(self, line: int | str) -> int:
        """The offset of ``line`` (given by offset or by name)."""
        if isinstance(line, int):
            if not 0 <= line < len(self.lines):
                raise IndexError(f"{self.name} has no line {line}")
            return line
        for index, candidate in enumerate(self.lines):
            if candidate.name == line:
                return index
        raise KeyError(f"{self.name} has no line named {line!r}")

    def line(self, line: int | str) -> GpioLine:
        """The model's state of ``line`` (by offset or name)."""
        return self.lines[self.offset(line)]

    def value(self, line: int | str) -> int:
        """What ``line`` carries now (driven by the test, or set by the driver)."""
        return self.line(line).value

    def drive(self, line: int | str, value: int, *, at: float | None = None,
              at_ns: int | None = None) -> None:
        """Put ``value`` (0 or 1) on ``line`` at virtual time ``at`` (seconds; or
        ``at_ns``, exact; default: now). An edge or level the driver armed is reported
        at exactly that instant."""
        offset, level = self.offset(line), int(bool(value))
        at_ns = either("at", at, at_ns)
        if at_ns is None and self.backend is None:
            self.lines[offset].value = level  # the value the chip powers up with
        elif at_ns is None:
            self.guard("drive", lambda: self._set_input(offset, level))
        elif self.backend is None:
            self._drives.append((offset, level, at_ns))  # scheduled once served
        else:
            self._schedule_drive(offset, level, at_ns)

    def fail(self, line: int | str | None = None, *, at: float | None = None,
             at_ns: int | None = None, until: float | None = None,
             until_ns: int | None = None) -> Fault:
        """From ``at`` (seconds; or ``at_ns``, exact; default: now) until ``until`` (or
        ``until_ns``; default: for ever), requests naming ``line`` (every line if None)
        answer VIRTIO_GPIO_STATUS_ERR. GET_NAMES, which names no line, is not affected.
        Change the returned fault's ``end_ns`` to end it later."""
        start = either("at", at, at_ns)
        if start is None:
            start = self.now_ns if self.backend else 0
        fault = Fault(None if line is None else self.offset(line), start,
                      either("until", until, until_ns))
        self.faults.append(fault)
        return fault

    def writes_to(self, line: int | str) -> list[tuple[int, int]]:
        """(time_ns, value) of every value the driver set on ``line``."""
        offset = self.offset(line)
        return [(write.time_ns, write.value) for write in self.writes if write.line == offset]

    # --- the device's side ----------------------------------------------------------

    def serve(self, clock: DeviceClock, path: str, seed: int, label: str | None = None
              ) -> Backend:
        backend = super().serve(clock, path, seed, label)
        drives, self._drives = self._drives, []
        for offset, level, at in drives:
            self._schedule_drive(offset, level, max(at, clock.now))
        return backend

    def _schedule_drive(self, offset: int, level: int, at: int) -> None:
        self.call_at(at, lambda: self._set_input(offset, level))

    def config(self) -> bytes:
        # The names themselves come with GET_NAMES; the config only says how long they are.
        return CONFIG.pack(len(self.lines), len(self._names_block()))

    def _names_block(self) -> bytes:
        if not any(line.name for line in self.lines):
            return b""  # no names: the driver skips GET_NAMES
        return b"".join(line.name.encode() + b"\0" for line in self.lines)

    def on_kick(self, queue: VirtQueue) -> None:
        if queue.index == REQUEST_QUEUE:
            answered = False
            while (chain := queue.pop()) is not None:
                self._answer(queue, chain)
                answered = True
            if answered:
                self.interrupt(queue)
        else:
            self._take_event_buffers(queue)

    def on_disconnect(self) -> None:
        # A kernel that comes back probes again: nothing it armed survives.
        for line in self.lines:
            line.event_buffer, line.latched, line.irq_type = None, False, "none"

    # --- requests -------------------------------------------------------------------

    def _answer(self, queue: VirtQueue, chain: Chain) -> None:
        kind, offset, value = REQUEST.unpack_from(queue.read(chain).ljust(REQUEST.size, b"\0"))
        if kind == MSG_GET_NAMES:
            queue.push(chain, queue.write(chain, bytes([STATUS_OK]) + self._names_block()))
            self._record(kind, offset, value, True)
            return
        ok = offset < len(self.lines) and kind in MESSAGE_NAMES and not any(
            fault.covers(offset, self.now_ns) for fault in self.faults)
        answer = self._perform(kind, offset, value) if ok else 0
        queue.push(chain, queue.write(chain, RESPONSE.pack(
            STATUS_OK if ok else STATUS_ERR, answer)))
        self._record(kind, offset, value, ok)

    def _record(self, kind: int, offset: int, value: int, ok: bool) -> None:
        self.requests.append(GpioRequest(self.now_ns, MESSAGE_NAMES.get(kind, str(kind)),
                                         offset, value, ok))

    def _perform(self, kind: int, offset: int, value: int) -> int:
        """Carry out a valid request; the response's value byte."""
        line = self.lines[offset]
        if kind == MSG_GET_DIRECTION:
            return {"none": 0, "out": 1, "in": 2}[line.direction]
        if kind == MSG_GET_VALUE:
            return line.value
        if kind == MSG_SET_DIRECTION:
            line.direction = DIRECTIONS.get(value, "none")
        elif kind == MSG_SET_VALUE:
            line.value = int(bool(value))
            self.writes.append(GpioWrite(self.now_ns, offset, line.value))
        elif kind == MSG_IRQ_TYPE:
            self._set_irq_type(offset, IRQ_TYPES.get(value, "none"))
        return 0

    # --- events ---------------------------------------------------------------------

    def _set_irq_type(self, offset: int, irq_type: str) -> None:
        line = self.lines[offset]
        line.irq_type, line.latched = irq_type, False
        if irq_type == "none" and line.event_buffer is not None:
            # Disabled: the spec has the device give the buffer back, marked invalid.
            self._report(offset, IRQ_STATUS_INVALID)
        else:
            self._check_level(offset)

    def _take_event_buffers(self, queue: VirtQueue) -> None:
        while (chain := queue.pop()) is not None:
            (offset,) = IRQ_REQUEST.unpack_from(queue.read(chain).ljust(IRQ_REQUEST.size,
                                                                          b"\0"))
            if offset >= len(self.lines):
                queue.push(chain, queue.write(chain, bytes([IRQ_STATUS_INVALID])))
                self.interrupt(queue)
                continue
            line = self.lines[offset]
            line.event_buffer = chain
            if line.latched:
                line.latched = False
                self._report(offset, IRQ_STATUS_VALID)
            else:
                self._check_level(offset)

    def _set_input(self, offset: int, value: int) -> None:
        line = self.lines[offset]
        before, line.value = line.value, value
        if before == value:
            return
        if line.irq_type in ("both", "rising" if value else "falling"):
            if line.event_buffer is not None:
                self._report(offset, IRQ_STATUS_VALID)
            else:
                line.latched = True
        else:
            self._check_level(offset)

    def _check_level(self, offset: int) -> None:
        """A level interrupt is reported whenever the level holds and a buffer waits."""
        line = self.lines[offset]
        wanted = {"high": 1, "low": 0}.get(line.irq_type)
        if wanted is not None and line.value == wanted and line.event_buffer is not None:
            self._report(offset, IRQ_STATUS_VALID)

    def _report(self, offset: int, status: int) -> None:
        line = self.lines[offset]
        chain, line.event_buffer = line.event_buffer, None
        if chain is None or self.backend is None:
            return
        queue = self.queue(EVENT_QUEUE)
        queue.push(chain, queue.write(chain, bytes([status])))
        if status == IRQ_STATUS_VALID:
            self.interrupts.append(GpioInterrupt(self.now_ns, offset, line.value))
        self.interrupt(queue)
