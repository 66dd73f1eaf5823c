"""virtio-gpio against the real driver (drivers/gpio/gpio-virtio.c) and libgpiod's tools:
the chip and its names, values both ways at their instants, edges reported at exactly
the instant the model drives them, and faults that send the kernel down its error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_umtt import NS_PER_S, Simulation, seconds_to_ns
from pytest_umtt.devices import VirtioGpio
from pytest_umtt.rootfs import Rootfs

pytestmark = pytest.mark.kernel

LINES = ["led", "button", "", "reset"]


def ns(thing: object, name: str) -> int:
    """An instant in exact ns, whether the API gives ``name`` in ns or float seconds
    beside an exact ``name_ns``."""
    return int(getattr(thing, f"{name}_ns", getattr(thing, name)))


def guest_stamp(instant: int) -> int:
    """How the guest stamps an event at virtual ``instant``: its clocksource counts in
    TIMER_MULTIPLIER units (256 ns, arch/um/kernel/time.c)."""
    return instant - instant % 256


def stamps(gpiomon_output: str) -> list[tuple[int, int]]:
    """(event type, stamp in ns) of each line gpiomon printed with ``-F '%e %s %n'``
    (its ``%n`` is not zero-padded)."""
    events = [line.split() for line in gpiomon_output.splitlines()]
    return [(int(kind), int(seconds) * NS_PER_S + int(nanos)) for kind, seconds, nanos in events]


def test_the_guest_sees_the_chip_and_its_line_names(uml_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[VirtioGpio(LINES)])
        assert "gpiochip0 [virtio1] (4 lines)" in machine.run("gpiodetect").output
        info = machine.run("gpioinfo gpiochip0").output
        assert '"led"' in info and '"button"' in info and '"reset"' in info
        assert "line   2:      unnamed" in info


def test_values_both_ways_at_their_instants(uml_kernel: Path, rootfs: Rootfs) -> None:
    chip = VirtioGpio(LINES)
    chip.drive("button", 1)  # powers up high
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[chip])
        assert machine.run("gpioget gpiochip0 1").output == "1\n"
        chip.drive("button", 0)
        assert machine.run("gpioget gpiochip0 1").output == "0\n"
        setting = machine.run("gpioset gpiochip0 0=1 3=0")
        assert setting.ok, setting.stderr
        writes = {line: (time, value) for time, line, value in chip.writes}
        assert writes[0][1] == 1 and writes[3][1] == 0
        assert writes[0][0] == writes[3][0]  # one request for both lines, one instant
        assert ns(setting, "started") <= writes[0][0] <= ns(setting, "ended")
        assert chip.line("led").direction == "none"  # gpioset released it on exit


def test_a_fault_from_an_instant_on_fails_requests_on_that_line(uml_kernel: Path,
                                                               rootfs: Rootfs) -> None:
    chip = VirtioGpio(LINES)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[chip])
        broken = sim.now_ns + seconds_to_ns(2)
        chip.fail("reset", at_ns=broken)
        assert machine.run("gpioget gpiochip0 3").ok
        assert machine.run("gpioget gpiochip0 1").ok
        sim.advance(2.0)
        failed = machine.run("gpioget gpiochip0 3")
        assert not failed.ok and "error" in failed.stderr.decode()
        assert machine.run("gpioget gpiochip0 1").output == "0\n"  # other lines work
        assert "GPIO request failed: 3" in machine.run("dmesg").output
        refused = [request for request in chip.requests if not request.ok]
        assert refused and all(request.line == 3 and request.time_ns >= broken
                               for request in refused)


def test_an_edge_reaches_gpiomon_at_its_exact_instant(uml_kernel: Path,
                                                      rootfs: Rootfs) -> None:
    chip = VirtioGpio(LINES)
    chip.drive("button", 1, at=1.5)
    pressed = seconds_to_ns(1.5)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[chip])
        monitor = machine.start("gpiomon -n 1 -r -F '%e %s %n' gpiochip0 1")
        result = monitor.wait(timeout=10)
        assert result.ok, result.stderr
        # The guest's CLOCK_MONOTONIC is virtual time: the kernel stamped the event then
        # (1.5 s is a whole number of the guest clock's 256 ns ticks).
        assert stamps(result.output) == [(1, pressed)] == [(1, guest_stamp(pressed))]
        assert chip.interrupts == [(pressed, 1, 1)]
        assert [interrupt.time for interrupt in chip.interrupts] == [1.5]
        assert ns(result, "ended") >= pressed


def test_edges_follow_the_irq_type_the_driver_asked_for(uml_kernel: Path,
                                                        rootfs: Rootfs) -> None:
    chip = VirtioGpio(LINES)
    for step, value in enumerate([1, 0, 1, 0]):
        chip.drive("button", value, at=1.0 + 0.25 * step)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[chip])
        falling = machine.run("gpiomon -n 2 -f -F '%e %s %n' gpiochip0 1", timeout=10)
        falls = [seconds_to_ns(1.25), seconds_to_ns(1.75)]
        assert stamps(falling.output) == [(0, guest_stamp(fall)) for fall in falls]
        assert [time for time, _, _ in chip.interrupts] == falls
        assert chip.line("button").irq_type == "none"  # released again


def test_edges_closer_than_the_driver_takes_them_are_latched_not_lost(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    chip = VirtioGpio(LINES)
    glitch = seconds_to_ns(1)
    for value, at in ((1, glitch), (0, glitch), (1, glitch + 1)):
        chip.drive("button", value, at_ns=at)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[chip])
        seen = machine.run("gpiomon -n 3 -F '%e %s %n' gpiochip0 1", timeout=10)
        assert len(stamps(seen.output)) == 3
        # The second edge waits for the buffer the driver queues again on unmask,
        # the third for the one after; none is dropped.
        reported = [time for time, _, _ in chip.interrupts]
        assert reported[:2] == [glitch, glitch] and glitch + 1 < reported[2] < glitch + 10_000
