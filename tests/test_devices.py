"""Devices on the virtual clock, against real kernels and their real virtio drivers: the
seeded virtio-rng, and the virtio console the guest agent runs its commands over."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_umtt import Simulation
from pytest_umtt.devices import VirtioRng
from pytest_umtt.rootfs import Rootfs

pytestmark = pytest.mark.kernel

HWRNG_READ = "head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n'"


def hwrng_and_pool(kernel: Path, rootfs: Rootfs, seed: int) -> tuple[str, str]:
    with Simulation(kernel=kernel, rootfs=rootfs, seed=seed) as sim:
        machine = sim.machine("m", devices=[VirtioRng()])
        device = machine.run(HWRNG_READ).output
        pool = machine.run("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").output
    return device, pool


def test_virtio_rng_is_the_guests_hwrng_and_follows_the_seed(uml_kernel: Path,
                                                             rootfs: Rootfs) -> None:
    first, again, other = (hwrng_and_pool(uml_kernel, rootfs, seed) for seed in (0, 0, 1))
    assert first == again
    assert first[0] != other[0] and first[1] != other[1]
    assert len(first[0]) == 64


def test_a_request_is_answered_after_the_models_latency(uml_kernel: Path,
                                                        rootfs: Rootfs) -> None:
    rng = VirtioRng(latency=0.25)
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", devices=[rng])
        assert machine.run("cat /sys/class/misc/hw_random/rng_current").output == \
            "virtio_rng.0\n"
        served = rng.bytes_served
        read = machine.run("head -c 16 /dev/hwrng > /dev/null")
        assert rng.bytes_served > served
        assert read.duration >= 0.25
        assert rng.answers and all(answered - asked == 250_000_000
                                   for asked, answered in rng.answers)


# --- the agent's console -----------------------------------------------------------------

def test_a_command_starts_at_the_instant_it_is_submitted_even_after_idling(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m")
        assert machine.agent_console is not None
        for idle in (0.0123, 7.5, 3600.0):
            sim.advance(idle)
            submitted = sim.now_ns
            assert machine.run("true").started_ns == submitted


def test_messages_per_command_over_the_console(uml_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m")
        backend = machine.agent_console.backend if machine.agent_console else None
        assert backend is not None
        machine.run("true")
        before = backend.messages_received + backend.messages_sent
        machine.run("true")
        # The command's number in (interrupt and its reply), its end out (kick and ack).
        assert backend.messages_received + backend.messages_sent - before == 4


def test_what_a_guest_command_writes_to_the_agents_console_changes_nothing(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m")
        # A forged "done" for the next command, garbage, and a half line.
        spoof = machine.run("printf 'D 2 0\\nnonsense\\nD 99' > /dev/hvc0")
        assert spoof.ok
        slept = machine.run("sleep 2; echo done")
        assert slept.output == "done\n"
        assert slept.duration >= 2


def test_the_polling_agent_remains_for_kernels_without_a_virtio_console(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine("m", agent_console=False)
        assert machine.agent_console is None and not machine.devices
        result = machine.run("echo $((6 * 7))")
        assert result.output == "42\n"
        assert machine.doorbells  # it rang
