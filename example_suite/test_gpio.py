"""A GPIO chip with a Python model behind it: the test presses buttons at exact instants,
reads what the guest put on its LEDs, and breaks a line to watch the driver cope."""

from pytest_umtt import MachineFactory, Simulation, ns_to_seconds
from pytest_umtt.devices import VirtioGpio


def test_a_button_press_is_seen_at_its_exact_instant(umtt_machine_factory: MachineFactory) -> None:
    chip = VirtioGpio(["led", "button"])
    chip.drive("button", 1, at=1.5)
    board = umtt_machine_factory("board", devices=[chip])
    press = board.start("gpiomon -n 1 -r -F '%s %n' gpiochip0 1").wait(timeout=10)
    # Event stamps (seconds, nanoseconds) are the guest's CLOCK_MONOTONIC: virtual time.
    assert press.output == "1 500000000\n"


def test_the_guest_blinks_the_led(umtt_machine_factory: MachineFactory) -> None:
    chip = VirtioGpio(["led", "button"])
    board = umtt_machine_factory("board", devices=[chip])
    blink = board.run("for i in 1 2 3; do gpioset gpiochip0 0=1; sleep 0.1; "
                      "gpioset gpiochip0 0=0; sleep 0.1; done")
    assert blink.ok, blink.stderr
    writes = chip.writes_to("led")  # (time_ns, value), exact
    assert [value for _, value in writes] == [1, 0] * 3
    times = [time_ns for time_ns, _ in writes]
    lit = [ns_to_seconds(off - on) for on, off in zip(times[0::2], times[1::2], strict=True)]
    assert all(0.1 <= span < 0.11 for span in lit), lit


def test_a_broken_line_fails_from_its_instant(umtt_machine_factory: MachineFactory,
                                              umtt_sim: Simulation) -> None:
    chip = VirtioGpio(["led", "button"])
    board = umtt_machine_factory("board", devices=[chip])
    chip.fail("button", at=umtt_sim.now + 1.0)
    assert board.run("gpioget gpiochip0 1").ok
    umtt_sim.advance(1.0)
    broken = board.run("gpioget gpiochip0 1")
    assert not broken.ok
    assert "GPIO request failed: 1" in board.run("dmesg").output
