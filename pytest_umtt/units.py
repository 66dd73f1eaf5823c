"""Virtual time's two spellings, and the one place that converts between them.

At the user API a time is float seconds under a bare name (``now``, ``at=``,
``latency=``) and exact integer nanoseconds beside it under the same name with ``_ns``
(``now_ns``, ``at_ns=``, ``latency_ns=``). Inside (the controller, the trace, device
models) everything is integer nanoseconds. Seconds become nanoseconds here, once,
rounding to the nearest, after a check that names the argument.
"""

from __future__ import annotations

import math
import warnings

NS_PER_S = 10**9
MAX_SECONDS = 1e9
"""About 31 years: far beyond any test, and its nanoseconds (plus any instant a run
reaches) still fit the protocol's s64."""
MAX_NS = int(MAX_SECONDS) * NS_PER_S


class UnitChangedWarning(FutureWarning):
    """A name that used to give integer nanoseconds now gives float seconds."""


def ns_to_seconds(ns: int) -> float:
    """Nanoseconds as float seconds (for showing and comparing; ``_ns`` stays exact)."""
    return ns / NS_PER_S


def seconds_to_ns(seconds: float, name: str = "seconds") -> int:
    """Float seconds as exact nanoseconds (rounded to the nearest); ``name`` is the
    argument a ValueError names when ``seconds`` is negative, not finite or above
    :data:`MAX_SECONDS`."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {seconds!r}")
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SECONDS):
        raise ValueError(f"{name} must be a number of virtual seconds from 0 to "
                         f"{MAX_SECONDS:g}, got {seconds!r}")
    return round(seconds * NS_PER_S)


def check_ns(ns: int, name: str) -> int:
    """``ns`` itself, after checking it is an integer from 0 to :data:`MAX_NS`."""
    if isinstance(ns, bool) or not isinstance(ns, int):
        raise TypeError(f"{name} must be an integer number of nanoseconds, got {ns!r}")
    if not 0 <= ns <= MAX_NS:
        raise ValueError(f"{name} must be from 0 to {MAX_NS} ns, got {ns!r}")
    return ns


def either(name: str, seconds: float | None, ns: int | None) -> int | None:
    """The nanoseconds of an argument given as ``name=`` (seconds) or ``name_ns=``
    (exact), or None when neither was; both at once is an error naming them."""
    if seconds is not None and ns is not None:
        raise TypeError(f"give {name}= (seconds) or {name}_ns= (nanoseconds), not both")
    if seconds is not None:
        return seconds_to_ns(seconds, f"{name}=")
    return None if ns is None else check_ns(ns, f"{name}_ns=")


def format_ns(ns: int) -> str:
    """Render a virtual time in nanoseconds as seconds with nanosecond precision."""
    sign = "-" if ns < 0 else ""
    seconds, rest = divmod(abs(ns), NS_PER_S)
    return f"{sign}{seconds}.{rest:09d} s"


_warned: set[str] = set()


def warn_unit_changed(where: str, exact: str) -> None:
    """Say once per process that ``where`` is seconds now (it was nanoseconds), so code
    written for nanoseconds is found; ``exact`` names the integer spelling."""
    if where in _warned:
        return
    _warned.add(where)
    warnings.warn(UnitChangedWarning(
        f"{where} is virtual seconds (a float) now; it used to be integer nanoseconds: "
        f"use {exact} for those"), stacklevel=3)
