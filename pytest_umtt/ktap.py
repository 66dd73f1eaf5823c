"""KTAP, as KUnit prints it on the console: results per test case.

The parser follows the kernel's own ``tools/testing/kunit/kunit.py`` wherever the
format leaves room for judgement, so that a console gives the same cases here as there:

* The document starts at the first ``KTAP version N`` (or ``TAP version N``) line;
  whatever precedes that text on its line (a printk timestamp, a caller id) is taken to
  be a prefix of every following line and cut off. It ends at the console's end or at
  a line saying the boot is over (``reboot: System halted`` and the like).
* Indentation carries no meaning: the nesting comes from ``KTAP version``/``# Subtest:``
  headers, plans (``1..N``) and a suite's own result line, so 2-space (the KTAP
  specification's), 4-space and tab indentation all parse alike.
* A suite that planned N cases but stopped early (the kernel crashed, the console
  ended) gets a :attr:`KtapStatus.CRASHED` case for each one missing; the first of them
  holds the output that followed the last result, which is usually the crash.
* A subtest that ran nothing (a header and a result, nothing between) is
  :attr:`KtapStatus.NO_TESTS`, not a pass.

Cases are named as kunit.py names them: the enclosing suites' names and the case's,
joined with dots (``list-kunit-test.list_test_list_init``; parameterised cases get one
more component). A case that never printed a name (a crashed one) is ``case-N``, N
being its number in its suite. Each case keeps the diagnostic lines printed before it.
"""

from __future__ import annotations

import enum
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field


class KtapStatus(enum.Enum):
    """What became of one test case."""

    PASSED = "passed"
    FAILED = "failed"
    SKIPPED = "skipped"
    CRASHED = "crashed"
    """It never printed a result: the kernel died or the output stopped first."""
    NO_TESTS = "no tests"
    """A subtest that contained nothing to run."""


@dataclass(frozen=True, slots=True)
class KtapCase:
    """One test case's result.

    ``diagnostics`` are the lines printed for the case before its result (for the
    first crashed case of a suite: everything printed after the last result), with the
    console prefix and their common indentation removed. ``lines`` are the indices into
    ``text.splitlines()`` of the console lines the case covers, its result line
    included; for a crashed case they are where the crash can be read.
    """

    name: str
    status: KtapStatus
    reason: str = ""
    diagnostics: tuple[str, ...] = ()
    lines: range = range(0)
    parent: str = ""
    """The full name of the test it is a subtest of ("" at the top): its suite, or for a
    parameter of a parameterised case, that case."""

    @property
    def ok(self) -> bool:
        """Not a failure: passed, skipped, or ran nothing."""
        return self.status not in (KtapStatus.FAILED, KtapStatus.CRASHED)

    @property
    def skipped(self) -> bool:
        """Skipped, or ran nothing (which a report shows the same way)."""
        return self.status in (KtapStatus.SKIPPED, KtapStatus.NO_TESTS)

    @property
    def crashed(self) -> bool:
        """Never reported a result."""
        return self.status is KtapStatus.CRASHED


def parse_ktap(text: str, *, parents: bool = False) -> list[KtapCase]:
    """Every leaf result (test case) of the first KTAP document in ``text``; with
    ``parents``, each test that has subtests too (a suite, a parameterised case: its own
    result line), just before them."""
    lines = _extract(text)
    if not lines:
        return []
    return list(_cases(_parse_document(_Cursor(lines)), (), parents=parents))


# --- Lines -------------------------------------------------------------------------

class _Kind(enum.Enum):
    VERSION = enum.auto()
    SUBTEST = enum.auto()
    PLAN = enum.auto()
    RESULT = enum.auto()
    OTHER = enum.auto()


# Leading whitespace is allowed everywhere because indentation is not structure.
_PATTERNS = {
    _Kind.VERSION: re.compile(r"\s*K?TAP version \d+$"),
    _Kind.SUBTEST: re.compile(r"\s*# Subtest: (.*)$"),
    _Kind.PLAN: re.compile(r"\s*1\.\.(\d+)"),
    # A name cannot contain '#': that starts the directive (" # SKIP reason").
    # "ok 2 # SKIP why" (kselftest's skips) and a bare "ok 3" are results too.
    _Kind.RESULT: re.compile(r"\s*(ok|not ok) (\d+)(?: - | )?([^#]*?)(?: ?# (.*))?$"),
}
_START = re.compile(r"K?TAP version \d+$")
# What the kernel prints once the tests are over and it goes on to boot or stop.
_END_MARKS = ("List of all partitions:", "Kernel panic - not syncing: VFS:",
              "reboot: System halted")
# " # SKIP" anywhere in the directive skips; as in kunit.py, the name then runs up to
# the last one ("a # TODO # SKIP why" is the skipped case "a # TODO").
_SKIP = re.compile(r"(?:(.*) # )?SKIP(.*)$")


@dataclass(frozen=True, slots=True)
class _Line:
    number: int  # index into the console's text.splitlines()
    text: str  # without the console prefix
    kind: _Kind
    match: re.Match[str] | None


def _classify(number: int, text: str) -> _Line:
    for kind, pattern in _PATTERNS.items():
        match = pattern.match(text)
        if match:
            return _Line(number, text, kind, match)
    return _Line(number, text, _Kind.OTHER, None)


def _extract(text: str) -> list[_Line]:
    """The KTAP document's lines, each without the prefix its version line had."""
    console = [line.rstrip() for line in text.splitlines()]
    first, start = next(((i, m) for i, line in enumerate(console)
                         if (m := _START.search(line))), (0, None))
    if start is None:
        return []
    lines = [_classify(first, console[first][start.start():])]
    for number in range(first + 1, len(console)):
        if any(mark in console[number] for mark in _END_MARKS):
            break
        lines.append(_classify(number, console[number][start.start():]))
    return lines


class _Cursor:
    """The document's lines, read front to back."""

    def __init__(self, lines: list[_Line]) -> None:
        self._lines = lines
        self._pos = 0

    def peek(self) -> _Line | None:
        return self._lines[self._pos] if self._pos < len(self._lines) else None

    def take(self, kind: _Kind) -> re.Match[str] | None:
        line = self.peek()
        if line is None or line.kind is not kind:
            return None
        self._pos += 1
        return line.match

    def take_while(self, *kinds: _Kind) -> list[_Line]:
        start = self._pos
        while (line := self.peek()) is not None and line.kind in kinds:
            self._pos += 1
        return self._lines[start:self._pos]

    def here(self) -> int:
        """The console line number of the next line (one past the last at the end)."""
        line = self.peek()
        return line.number if line else self._lines[-1].number + 1


# --- Structure ---------------------------------------------------------------------

@dataclass(slots=True)
class _Test:
    number: int
    first: int  # console line number where its output starts
    log: list[_Line]
    name: str = ""
    status: KtapStatus = KtapStatus.CRASHED  # until its result line says otherwise
    reason: str = ""
    plan: int | None = None
    children: list[_Test] = field(default_factory=list)
    end: int = 0  # console line number just past its output


def _parse_document(cursor: _Cursor) -> _Test:
    top = _Test(0, cursor.here(), [])
    cursor.take(_Kind.VERSION)
    top.log += cursor.take_while(_Kind.OTHER)
    top.plan = _take_plan(cursor)
    _parse_children(cursor, top, nested=False)
    return top


def _take_plan(cursor: _Cursor) -> int | None:
    plan = cursor.take(_Kind.PLAN)
    return int(plan.group(1)) if plan else None


def _parse_children(cursor: _Cursor, parent: _Test, *, nested: bool) -> None:
    """Subtests until the plan is met or, without a plan, the parent's result line."""
    number = 1
    while parent.plan is None or number <= parent.plan:
        first = cursor.here()
        # A plan line where a test should start would stop kunit.py for good (it
        # neither takes nor skips it); reading it as a diagnostic keeps going.
        log = cursor.take_while(_Kind.OTHER, _Kind.PLAN)
        if cursor.peek() is None or (nested and _is_result_of(cursor.peek(), parent)):
            if parent.plan is None:
                parent.log += log
                return
            child = _Test(number, first, log)  # planned, never reported: crashed
            child.end = cursor.here()
        else:
            child = _parse_test(cursor, number, first, log)
        parent.children.append(child)
        number += 1


def _is_result_of(line: _Line | None, test: _Test) -> bool:
    return (line is not None and line.kind is _Kind.RESULT and line.match is not None
            and line.match.group(3) == test.name)


def _parse_test(cursor: _Cursor, number: int, first: int, log: list[_Line]) -> _Test:
    test = _Test(number, first, log)
    suite = _parse_header(cursor, test)
    if suite:
        test.log += cursor.take_while(_Kind.OTHER)
        test.plan = _take_plan(cursor)
        _parse_children(cursor, test, nested=True)
        test.log += cursor.take_while(_Kind.OTHER)
    _parse_result(cursor, test)
    if suite and not test.children and test.status in (KtapStatus.CRASHED,
                                                        KtapStatus.PASSED):
        test.status = KtapStatus.NO_TESTS
    test.end = cursor.here()
    return test


def _parse_header(cursor: _Cursor, test: _Test) -> bool:
    """``KTAP version N`` and/or ``# Subtest: name``: a suite rather than a case."""
    versioned = cursor.take(_Kind.VERSION) is not None
    subtest = cursor.take(_Kind.SUBTEST)
    if subtest:
        test.name = subtest.group(1)
    return versioned or subtest is not None


def _parse_result(cursor: _Cursor, test: _Test) -> None:
    line = cursor.peek()
    if line is None or line.kind is not _Kind.RESULT or line.match is None:
        return
    if test.name and not _is_result_of(line, test):
        return  # another test's result: this one never finished
    cursor.take(_Kind.RESULT)
    verdict, _, name, directive = line.match.groups()
    test.name = name
    skip = _SKIP.match(directive or "")
    if skip:
        before, reason = skip.groups()
        test.name = f"{name} # {before}" if before is not None else name
        test.status, test.reason = KtapStatus.SKIPPED, reason.strip()
    else:
        test.status = KtapStatus.PASSED if verdict == "ok" else KtapStatus.FAILED


# --- Cases -------------------------------------------------------------------------

def _cases(test: _Test, path: tuple[str, ...], *, parents: bool) -> Iterator[KtapCase]:
    for child in test.children:
        if child.children:
            if parents and child.name:
                yield _case(child, path)
            yield from _cases(child, (*path, child.name) if child.name else path,
                              parents=parents)
        else:
            yield _case(child, path)


def _case(test: _Test, path: tuple[str, ...]) -> KtapCase:
    name = ".".join((*path, test.name or f"case-{test.number}"))
    reason = test.reason or ("no tests run" if test.status is KtapStatus.NO_TESTS else "")
    return KtapCase(name, test.status, reason, _dedent(test.log), range(test.first, test.end),
                    ".".join(path))


def _dedent(log: list[_Line]) -> tuple[str, ...]:
    # Keeps relative indentation: a stack trace or a nested message stays readable.
    if not log:
        return ()
    return tuple(textwrap.dedent("\n".join(line.text for line in log)).split("\n"))
