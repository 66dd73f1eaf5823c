"""virtio-rng (virtio 1.x, 5.4): random bytes drawn from the run's seed.

The guest's hwrng core reads it and mixes what it reads into the entropy pool, so a
kernel with this device gets the same randomness for the same seed, and another seed
changes it. ``latency`` (seconds; ``latency_ns`` exact) is how long a request takes
in virtual time.
"""

from __future__ import annotations

from ..units import either
from .device import VirtioDevice
from .virtqueue import VirtQueue

DEVICE_ID_RNG = 4
MAX_REQUEST_BYTES = 64 * 1024
"""The most one request gets (the driver asks for 32 or 64 bytes at a time; a device may
fill less than a buffer holds)."""
MAX_ANSWER_BYTES = 1 << 20
"""The most one answer draws; requests beyond it are answered ``latency_ns`` later."""


DEFAULT_LATENCY_NS = 1_000_000
"""1 ms from a request to its answer, unless ``latency=`` (or ``latency_ns=``) says."""


class VirtioRng(VirtioDevice):
    """Fills every request with seeded bytes, ``latency`` seconds (``latency_ns``)
    after the driver asked."""

    device_id = DEVICE_ID_RNG
    num_queues = 1

    def __init__(self, name: str = "rng", *, latency: float | None = None,
                 latency_ns: int | None = None) -> None:
        super().__init__(name)
        given = either("latency", latency, latency_ns)
        self.latency_ns = DEFAULT_LATENCY_NS if given is None else given
        self.bytes_served = 0
        self.answers: list[tuple[int, int]] = []
        """(asked, answered) virtual instants (ns) of every request."""

    def on_kick(self, queue: VirtQueue) -> None:
        asked = self.now_ns
        self.call_at(asked + self.latency_ns, lambda: self._answer(queue, asked))

    def _answer(self, queue: VirtQueue, asked: int) -> None:
        self.answers.append((asked, self.now_ns))
        drawn = 0
        while drawn < MAX_ANSWER_BYTES and (chain := queue.pop()) is not None:
            # The buffers were checked when the chain was taken: nothing is drawn for
            # memory that is not there.
            wanted = min(chain.capacity, MAX_REQUEST_BYTES, MAX_ANSWER_BYTES - drawn)
            written = queue.write(chain, self.random.randbytes(wanted))
            queue.push(chain, written)
            drawn += wanted
            self.bytes_served += written
        if drawn >= MAX_ANSWER_BYTES and queue.pending():
            self.on_kick(queue)  # the rest, after another latency
        self.interrupt(queue)
