"""Triage of flaky tests: how often a test fails, which failures are one failure, and the
fewest perturbed decisions a failing run needs.

Plain functions, no pytest: :func:`wilson_interval` (a failure rate's 95% interval),
:func:`failure_signature` (an exception as a key that groups equal failures: its type,
its message with numbers, addresses, times and paths masked, and for a kernel crash the
report's kind and the first frames of its call trace), and :func:`ddmin` (delta
debugging: the smallest subset of decisions that still fails).

The call-trace parser here is deliberately small and self-contained (a frame is
``function+0xOFF/0xLEN``, unreliable ``?`` frames are skipped); it reads what
:class:`~pytest_umtt.errors.MachineCrashed` carries, the console tail.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import BudgetSpent, MachineError
from .signature import leading_frames

Z_95 = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95% interval."""


def wilson_interval(failures: int, runs: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a failure rate: unlike the normal approximation it
    stays inside [0, 1] and is not empty for 0 or ``runs`` failures (0 of 20 still
    allows a rate up to 16%). ``(0.0, 1.0)`` when nothing ran."""
    if not 0 <= failures <= runs:
        raise ValueError(f"failures must be within 0..runs, got {failures} of {runs}")
    if runs == 0:
        return 0.0, 1.0
    rate = failures / runs
    scale = 1 + z * z / runs
    centre = (rate + z * z / (2 * runs)) / scale
    spread = z / scale * math.sqrt(rate * (1 - rate) / runs + z * z / (4 * runs * runs))
    # Exact at the ends: rounding must not put 0 failures above 0.
    low = 0.0 if failures == 0 else max(0.0, centre - spread)
    high = 1.0 if failures == runs else min(1.0, centre + spread)
    return low, high


def format_rate(failures: int, runs: int) -> str:
    """``30.0% (95% CI 14.5%-51.9%)``."""
    low, high = wilson_interval(failures, runs)
    rate = failures / runs if runs else 0.0
    return f"{rate:.1%} (95% CI {low:.1%}-{high:.1%})"


# --- failure signatures ---------------------------------------------------------------

# Order matters: paths and times before bare numbers, hex before decimal.
_MASKS = (
    (re.compile(r"(?<![\w.])(?:~|\.{1,2})?(?:/[\w.@%+=,-]+)+/?"), "<path>"),
    (re.compile(r"\b\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?\b"), "<time>"),
    (re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|seconds?|min)\b"), "<time>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    # Addresses and digests: 8+ hex digits with a letter, or 16+ digits (a 64-bit word).
    (re.compile(r"\b(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,}\b|\b\d{16,}\b"), "<hex>"),
    (re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?(?![\w.])"), "<N>"),
)
MAX_SIGNATURE_MESSAGE = 200
CRASH_FRAMES = 4
"""How many call-trace frames a crash's signature keeps (the innermost ones)."""


def mask(text: str) -> str:
    """``text`` with what differs between runs of one failure masked: paths as
    ``<path>``, hex numbers and addresses as ``<hex>``, times as ``<time>``, other
    numbers as ``<N>``. Digits inside names (``eth0``, ``test_x2``) stay."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


def call_trace_frames(console: str, count: int = CRASH_FRAMES) -> list[str]:
    """The first ``count`` function names of the first call trace in ``console``, the
    reporting machinery's frames left out, as a splat's signature takes them
    (:func:`~pytest_umtt.signature.leading_frames`); [] when there is none."""
    lines = [CONSOLE_STAMP.sub("", line, count=1) for line in console.splitlines()]
    return [frame.function for frame in leading_frames(lines, count)]


CONSOLE_STAMP = re.compile(r"^\[\d+\.\d+ s\] ?")
"""The virtual time a console tail puts before each line (``[2.000100000 s] ``)."""


def failure_signature(error: BaseException) -> str:
    """What groups failures that are one failure: the exception type and its message's
    first line, masked. A machine error gives its cause instead of its console; when the
    console shows a call trace, its first frames (innermost first) join the signature,
    as crash fingerprints do."""
    kind = type(error).__name__
    if isinstance(error, MachineError):
        cause = re.sub(r"\s*\(seen at [^)]*\)", "", error.what)
        message = mask(cause)[:MAX_SIGNATURE_MESSAGE]
        frames = call_trace_frames(error.console_tail)
        return f"{kind}: {message}" + (f" | {' < '.join(frames)}" if frames else "")
    lines = str(error).strip().splitlines()
    message = mask(lines[0]) if lines else ""
    if len(message) > MAX_SIGNATURE_MESSAGE:
        message = message[:MAX_SIGNATURE_MESSAGE] + "..."
    return f"{kind}: {message}" if message else kind


# --- delta debugging -----------------------------------------------------------------

T = TypeVar("T", bound=Hashable)


@dataclass
class DdminResult(Generic[T]):
    """What :func:`ddmin` found: the smallest failing subset it reached, how many runs
    it took, and whether it finished (``complete``: 1-minimal, removing any one item
    makes the failure go away) or stopped at its budget."""

    minimal: list[T]
    runs: int
    complete: bool
    tested: dict[frozenset[T], bool] = field(default_factory=dict)


def _split(items: Sequence[T], parts: int) -> list[list[T]]:
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return [chunk for chunk in chunks if chunk]


class _Tester(Generic[T]):
    """Runs the predicate once per distinct subset, within a budget."""

    def __init__(self, fails: Callable[[list[T]], bool], budget: int | None) -> None:
        self.fails = fails
        self.budget = budget
        self.tested: dict[frozenset[T], bool] = {}
        self.runs = 0

    def __call__(self, subset: list[T]) -> bool:
        key = frozenset(subset)
        if key not in self.tested:
            if self.budget is not None and self.runs >= self.budget:
                raise BudgetSpent
            self.runs += 1
            self.tested[key] = self.fails(subset)
        return self.tested[key]


def _reduce_once(current: list[T], parts: int, test: _Tester[T]) -> tuple[list[T], int] | None:
    """One ddmin step: a failing chunk (back to 2 parts) or a failing complement (one
    part fewer); None when neither fails at this granularity."""
    chunks = _split(current, parts)
    for chunk in chunks:
        if test(chunk):
            return chunk, 2
    if len(chunks) > 2:
        for index in range(len(chunks)):
            complement = [item for i, chunk in enumerate(chunks) if i != index
                          for item in chunk]
            if test(complement):
                return complement, max(parts - 1, 2)
    return None


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool],
          budget: int | None = None) -> DdminResult[T]:
    """Zeller's delta debugging: from ``items`` (for which ``fails`` holds), a subset
    for which it still holds and from which no single item can be removed, calling
    ``fails`` on each subset at most once and at most ``budget`` times. Order is kept.
    The caller checks ``fails(items)`` and ``fails([])`` first, as it sees fit."""
    test: _Tester[T] = _Tester(fails, budget)
    current, parts = list(items), 2
    try:
        while len(current) >= 2:
            step = _reduce_once(current, parts, test)
            if step is not None:
                current, parts = step
            elif parts >= len(current):
                break
            else:
                parts = min(parts * 2, len(current))
    except BudgetSpent:
        return DdminResult(current, test.runs, False, test.tested)
    return DdminResult(current, test.runs, True, test.tested)
