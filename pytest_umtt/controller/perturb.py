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
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import format_ns
from .clock import Job


def derived_stream(seed: int, purpose: str) -> random.Random:
    """A generator for ``purpose`` from ``seed``: a string seed goes through SHA-512, so
    it is the same in every process (no hash randomisation) and unrelated to others."""
    return random.Random(f"pytest-umtt/{purpose}/{seed}")


class Perturbation:
    """The seeded choices a perturbed calendar makes.

    ``doorbell_latency`` (ns) bounds the doorbell delay; 0 leaves doorbells exact.
    """

    def __init__(self, seed: int, doorbell_latency: int = 0,
                 decisions: Decisions | None = None) -> None:
        self.seed = seed
        self.doorbell_latency = doorbell_latency
        self.ties = random.Random(seed)
        self.doorbells = derived_stream(seed, "doorbell-delay")
        self.decisions = Decisions() if decisions is None else decisions
        """Every choice made that an unperturbed run would not make, and which to apply."""

    def keeps_tie_order(self, now: int, first: Job, fifo: Job) -> bool:
        """At ``now`` the seeded order runs ``first`` before ``fifo``, which was queued
        earlier: whether it may (a :class:`~.clock.Clock` ``judge``)."""
        return self.decisions.decide("tie", f"{_owner(first)}>{_owner(fifo)}", now,
                                     _owner(fifo))

    @property
    def delays_doorbells(self) -> bool:
        """Whether doorbells are delayed at all."""
        return self.doorbell_latency > 0

    def doorbell_delay(self) -> int:
        """A delay in 0..doorbell_latency ns, from the doorbell stream."""
        return self.doorbells.randrange(self.doorbell_latency + 1)

    def __repr__(self) -> str:
        return f"<Perturbation seed={self.seed} doorbell_latency={self.doorbell_latency}>"


def _owner(job: Job) -> str:
    return str(getattr(job.owner, "name", type(job.owner).__name__))


DECISION_KINDS = {
    "tie": "ran before {value} (queued earlier) at one instant",
    "doorbell": "doorbell paused the test {value} ns late",
    "drop": "dropped a frame of {value} bytes",
    "reorder": "held a frame {value} ns, so later ones overtook it",
}
"""What each kind of perturbed decision is, and what its unperturbed value would be:
first-in-first-out, no delay, delivered, in order."""


@dataclass(frozen=True)
class Decision:
    """One choice a perturbed run made that an unperturbed run would not have made.

    ``key`` names it across runs of one seed: its kind, who made it (a machine, a
    link ``a>b``, for ties ``first>overtaken``) and which of that kind by that
    participant it was (``#3``), counting reverted ones too, so keeping or reverting one
    decision leaves the others' names alone as far as the run itself stays the same.
    """

    key: str
    kind: str
    time_ns: int
    who: str
    value: int | str

    def describe(self) -> str:
        """One line for people: instant, kind, participant, value."""
        what = DECISION_KINDS[self.kind].format(value=self.value)
        return f"{format_ns(self.time_ns)}  {self.kind:8} {self.who}: {what}  [{self.key}]"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Decision:
        return cls(str(data["key"]), str(data["kind"]), int(data["time_ns"]),
                   str(data["who"]), data["value"])


class Decisions:
    """The record of a run's perturbed decisions, and the policy of which to apply.

    By default every decision is applied (the perturbed run as its seed makes it);
    with ``keep`` only the decisions named there are, and every other one goes back to
    its unperturbed value. The seeded streams are drawn from all the same, so what a
    kept decision draws does not depend on which others were reverted."""

    def __init__(self, keep: Iterable[str] | None = None) -> None:
        self.keep = None if keep is None else frozenset(keep)
        self.applied: list[Decision] = []
        self.reverted: list[Decision] = []
        self._counts: Counter[tuple[str, str]] = Counter()

    def decide(self, kind: str, who: str, time_ns: int, value: int | str) -> bool:
        """A perturbation wants to make a decision: record it, and say whether to
        apply it (True) or to do what an unperturbed run does (False)."""
        self._counts[kind, who] += 1
        decision = Decision(f"{kind} {who} #{self._counts[kind, who]}", kind, time_ns, who,
                            value)
        applied = self.keep is None or decision.key in self.keep
        (self.applied if applied else self.reverted).append(decision)
        return applied

    def __len__(self) -> int:
        return len(self.applied)

    def __repr__(self) -> str:
        return f"<Decisions applied={len(self.applied)} reverted={len(self.reverted)}>"
