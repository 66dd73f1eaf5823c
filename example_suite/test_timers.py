"""Timers and sleeps, measured exactly in virtual time."""

import pytest

from pytest_umtt import Machine, Simulation


def test_sleep_takes_exactly_its_time(umtt_machine: Machine, umtt_sim: Simulation) -> None:
    with umtt_sim.elapsed(at_least=2.5, at_most=2.501):
        result = umtt_machine.run("sleep 2.5")
    assert result.duration == pytest.approx(2.5, abs=1e-3)


def test_many_short_sleeps_add_up(umtt_machine: Machine) -> None:
    # 100 sleeps of 10 ms: each costs a process, never extra virtual time beyond timer slack.
    result = umtt_machine.run("i=0; while [ $i -lt 100 ]; do sleep 0.01; i=$((i+1)); done")
    assert result.duration == pytest.approx(1.0, abs=0.01)


def test_timerfd_fires_on_time(umtt_machine: Machine) -> None:
    # Python in the guest: a periodic timerfd, read 5 times, 0.2 s apart.
    script = (
        "import ctypes, os, struct, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "fd = libc.timerfd_create(1, 0)\n"
        "spec = struct.pack('qqqq', 0, 200_000_000, 0, 200_000_000)\n"
        "assert libc.timerfd_settime(fd, 0, spec, None) == 0\n"
        "start = time.monotonic()\n"
        "for _ in range(5): os.read(fd, 8)\n"
        "print(f'{time.monotonic() - start:.6f}')\n"
    )
    result = umtt_machine.run(f"python3 -c \"{script}\"", timeout=30)
    assert result.status == 0, result.stderr
    assert float(result.output) == pytest.approx(1.0, abs=1e-3)
