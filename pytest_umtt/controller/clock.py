"""The event queue and the virtual clock: the bottom of the controller.

Knows nothing of sockets or of UML. A :class:`Clock` holds the virtual time in
nanoseconds, refuses to go backwards (:class:`~pytest_umtt.errors.ClockError`), and
keeps a queue of :class:`Job` entries: whatever participants asked to run when.
Ties run first-in-first-out, or in a seeded shuffled order when the clock is given a
random stream for them (to shake out races between participants that share an
instant). A device model can use it alone: schedule calls, then :meth:`Clock.run_until`.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ClockError, format_ns

TIE_BITS_SHIFT = 40
"""A seeded tie order puts 32 random bits above the insertion counter (2**40 entries)."""


@dataclass(eq=False, slots=True)
class Job:
    """An entry in the event queue; ``cancelled`` implements lazy deletion."""

    time: int
    order: int
    owner: object
    cancelled: bool = False

    def __lt__(self, other: Job) -> bool:
        """Queue order (the queue itself compares its entries' keys, not jobs)."""
        return (self.time, self.order) < (other.time, other.order)


# The queue holds (time, order, job): tuples compare in C, and ``order`` is unique, so
# a comparison never reaches the job.
_Entry = tuple[int, int, Job]


def _queued_at(job: Job) -> int:
    """The insertion counter under a job's seeded tie bits: first-in-first-out order."""
    return job.order & ((1 << TIE_BITS_SHIFT) - 1)


class ScheduledCall:
    """An in-process participant: a callback at a virtual time. Cancel it with cancel()."""

    def __init__(self, fn: Callable[[], object], name: str) -> None:
        self.fn = fn
        self.name = name
        self._job: Job | None = None

    @property
    def time(self) -> int | None:
        """When it will run, or None once it ran or was cancelled."""
        return None if self._job is None or self._job.cancelled else self._job.time

    def cancel(self) -> None:
        """Do not run it (a no-op once it ran)."""
        if self._job is not None:
            self._job.cancelled = True
            self._job = None

    def __repr__(self) -> str:
        return f"<ScheduledCall {self.name} at {self.time}>"


class Clock:
    """A virtual clock (ns) and the queue of what is due when.

    ``ties``, when given, orders jobs due at one instant by its random bits instead of
    first-in-first-out; the same stream state gives the same order. ``judge``, when
    given, is asked each time that order would run a job before one due at the same
    instant and queued earlier: ``judge(now, first, earlier)`` True lets it, False runs
    the earlier one first (first-in-first-out again, for that choice alone).
    """

    def __init__(self, ties: random.Random | None = None,
                 judge: Callable[[int, Job, Job], bool] | None = None) -> None:
        self.now = 0
        """The virtual time in nanoseconds: read it, move it only with :meth:`move_to`
        (a plain attribute: the calendar reads it about 15 times per kernel run)."""
        self._queue: list[_Entry] = []
        self._order = itertools.count()
        self._ties = ties
        self._judge = judge

    def __repr__(self) -> str:
        return f"<Clock now={format_ns(self.now)}>"

    def move_to(self, when: int) -> None:
        """Set the time to ``when``; ClockError if that is earlier than now."""
        if when < self.now:
            raise ClockError(self.now, when)
        self.now = when

    def schedule(self, when: int, owner: object) -> Job:
        """Queue ``owner`` at ``when`` (the caller checks for the past)."""
        order = next(self._order)
        if self._ties is not None:
            order |= self._ties.getrandbits(32) << TIE_BITS_SHIFT
        job = Job(when, order, owner)
        heapq.heappush(self._queue, (when, order, job))
        return job

    def call_at(self, when: int, fn: Callable[[], object], name: str = "") -> ScheduledCall:
        """Queue a call of ``fn`` at virtual time ``when``; ValueError if that is past."""
        if when < self.now:
            raise ValueError(f"cannot schedule {name or fn!r} at {format_ns(when)}: "
                             f"the clock is already at {format_ns(self.now)}")
        call = ScheduledCall(fn, name or getattr(fn, "__name__", "call"))
        call._job = self.schedule(when, call)
        return call

    def call_later(self, delay: int, fn: Callable[[], object], name: str = "") -> ScheduledCall:
        """Queue a call of ``fn`` ``delay`` nanoseconds from now."""
        return self.call_at(self.now + delay, fn, name)

    def peek(self) -> Job | None:
        """The next job, or None when nothing is queued."""
        queue = self._queue
        while queue and queue[0][2].cancelled:
            heapq.heappop(queue)
        return queue[0][2] if queue else None

    def pop_due(self, limit: int | None = None) -> Job | None:
        """Take the next job off the queue unless it is due after ``limit``. The clock
        does not move: the caller moves it (it may have more to do at that instant)."""
        job = self.peek()
        if job is None or (limit is not None and job.time > limit):
            return None
        if self._judge is not None:
            return self._judged_pop(job, self._judge)
        heapq.heappop(self._queue)
        return job

    def _judged_pop(self, first: Job, judge: Callable[[int, Job, Job], bool]) -> Job:
        """Take ``first`` (the seeded order's next job) or, if the judge says so, the job
        due at the same instant that was queued first. The others go back unchanged:
        their keys are a total order, so putting them back changes no later choice."""
        queue = self._queue
        tied = []
        while queue and queue[0][0] == first.time:
            job = heapq.heappop(queue)[2]
            if not job.cancelled:
                tied.append(job)
        earliest = min(tied, key=_queued_at)
        chosen = first
        if earliest is not first and not judge(first.time, first, earliest):
            chosen = earliest
        for job in tied:
            if job is not chosen:
                heapq.heappush(queue, (job.time, job.order, job))
        return chosen

    def run_until(self, deadline: int) -> int:
        """Run every call due up to ``deadline`` in order, then move to ``deadline``; how
        many ran. For a clock used alone: a job that is not a call is dropped."""
        ran = 0
        while (job := self.pop_due(deadline)) is not None:
            self.move_to(job.time)
            if isinstance(job.owner, ScheduledCall):
                job.owner._job = None
                job.owner.fn()
                ran += 1
        self.move_to(deadline)
        return ran
