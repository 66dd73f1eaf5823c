"""An RTC alarm (UML's rtc driver) wakes a reader of /dev/rtc0 on time."""

import pytest

from pytest_umtt import Machine


def test_rtc_alarm_interrupt_arrives_on_time(umtt_machine: Machine) -> None:
    result = umtt_machine.run(
        "echo 0 > /sys/class/rtc/rtc0/wakealarm; echo +3 > /sys/class/rtc/rtc0/wakealarm; "
        "dd if=/dev/rtc0 bs=8 count=1 status=none | od -An -tx1 >/dev/null; "
        "cat /proc/driver/rtc | grep alarm_IRQ", timeout=10)
    assert result.status == 0, result.stderr
    assert result.duration == pytest.approx(3.0, abs=1.0)
