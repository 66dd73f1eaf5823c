"""Two machines on one clock: their events interleave in an order we can check."""

from pytest_umtt import MachineFactory, Simulation


def test_ticks_interleave(umtt_machine_factory: MachineFactory, umtt_sim: Simulation) -> None:
    fast = umtt_machine_factory("fast", boot=False)
    slow = umtt_machine_factory("slow", boot=False)
    umtt_sim.boot(fast, slow)
    jobs = [fast.start("for i in 1 2 3 4; do sleep 1; echo tick-fast-$i > /dev/kmsg; done"),
            slow.start("for i in 1 2; do sleep 2.5; echo tick-slow-$i > /dev/kmsg; done")]
    for job in jobs:
        job.wait(timeout=30)
    ticks = sorted((line.time, line.text.split("tick-")[1])
                   for machine in (fast, slow) if machine.console
                   for line in machine.console.lines if "tick-" in line.text)
    assert [name for _, name in ticks] == [
        "fast-1", "fast-2", "slow-1", "fast-3", "fast-4", "slow-2"]
