"""A virtio-rng whose bytes come from the seed: the guest's own hwrng driver reads it,
each request answered exactly the model's latency later in virtual time."""

from pytest_umtt import MachineFactory
from pytest_umtt.devices import VirtioRng

LATENCY = 0.002  # seconds per request


def test_the_guest_reads_the_models_bytes(umtt_machine_factory: MachineFactory) -> None:
    rng = VirtioRng(latency=LATENCY)
    machine = umtt_machine_factory("entropy", devices=[rng])
    assert machine.run("cat /sys/class/misc/hw_random/rng_current").output == "virtio_rng.0\n"
    read = machine.run("head -c 64 /dev/hwrng | wc -c")
    assert read.output == "64\n"
    assert all(answered - asked == rng.latency_ns  # (asked, answered) in exact ns
               for asked, answered in rng.answers)


def test_hwrng_bytes_reach_the_guests_pool(umtt_machine_factory: MachineFactory) -> None:
    # The hwrng core mixes what it reads into the pool: urandom follows the seed too,
    # which --umtt-check-determinism and --umtt-explore show.
    machine = umtt_machine_factory("pool", devices=[VirtioRng(latency=LATENCY)])
    sample = machine.run("head -c 16 /dev/urandom | od -An -tx1").output
    assert len(sample.split()) == 16
