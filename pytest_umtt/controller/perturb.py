"""Perturbation policy: seeded randomness that shakes out races, reproducibly.

One seed gives two independent streams: the tie order (which of the events due at one
instant goes first) and the doorbell delay (how long after a broadcast the test sees it).
Each has its own generator, so how many draws one makes never shifts the other: a run
that rings one more doorbell keeps its tie order, and one more queued event does not move
a doorbell. The tie stream is seeded with the seed itself, as the single stream was
before the split, so a seed's tie orders in runs without doorbell delays are unchanged.
"""

from __future__ import annotations

import random


def derived_stream(seed: int, purpose: str) -> random.Random:
    """A generator for ``purpose`` from ``seed``: a string seed goes through SHA-512, so
    it is the same in every process (no hash randomisation) and unrelated to others."""
    return random.Random(f"pytest-umtt/{purpose}/{seed}")


class Perturbation:
    """The seeded choices a perturbed calendar makes.

    ``doorbell_latency`` (ns) bounds the doorbell delay; 0 leaves doorbells exact.
    """

    def __init__(self, seed: int, doorbell_latency: int = 0) -> None:
        self.seed = seed
        self.doorbell_latency = doorbell_latency
        self.ties = random.Random(seed)
        self.doorbells = derived_stream(seed, "doorbell-delay")

    @property
    def delays_doorbells(self) -> bool:
        """Whether doorbells are delayed at all."""
        return self.doorbell_latency > 0

    def doorbell_delay(self) -> int:
        """A delay in 0..doorbell_latency ns, from the doorbell stream."""
        return self.doorbells.randrange(self.doorbell_latency + 1)

    def __repr__(self) -> str:
        return f"<Perturbation seed={self.seed} doorbell_latency={self.doorbell_latency}>"
