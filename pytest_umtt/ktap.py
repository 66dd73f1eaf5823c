"""KTAP, as KUnit prints it on the console: results per test case.

Cases are named as kunit.py names them: the enclosing suites' names and the case's,
joined with dots (``list-kunit-test.list_test_list_init``; parameterised cases get one
more component). Each result keeps the diagnostic lines printed before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INDENT = 4
_RESULT = re.compile(r"^(not ok|ok) (\d+)(?: (?:- )?([^#]*?))?\s*(?:# (SKIP|TODO)\b\s*(.*))?$")
_SUBTEST = re.compile(r"^# Subtest: (.+)$")
_HEADER = re.compile(r"^K?TAP version \d+$")


@dataclass(frozen=True, slots=True)
class KtapCase:
    """One test case's result."""

    name: str
    ok: bool
    skipped: bool = False
    reason: str = ""
    diagnostics: tuple[str, ...] = ()


@dataclass
class _Level:
    name: str = ""
    children: int = 0


def _indent_and_text(raw: str) -> tuple[int, str]:
    expanded = raw.replace("\t", " " * INDENT)
    stripped = expanded.lstrip(" ")
    return (len(expanded) - len(stripped)) // INDENT, stripped.rstrip()


def parse_ktap(text: str) -> list[KtapCase]:
    """Every leaf result (test case) of the first KTAP document in ``text``."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if _HEADER.match(line.strip())), None)
    if start is None:
        return []
    levels: list[_Level] = [_Level()]
    pending: list[tuple[int, str]] = []  # diagnostics not yet claimed, with their depth
    cases: list[KtapCase] = []
    for raw in lines[start + 1:]:
        depth, line = _indent_and_text(raw)
        while len(levels) <= depth + 1:
            levels.append(_Level())
        subtest = _SUBTEST.match(line)
        result = _RESULT.match(line)
        if subtest:
            levels[depth] = _Level(subtest.group(1))
            levels[depth + 1] = _Level()
            pending = [(d, text) for d, text in pending if d < depth]
        elif result:
            claimed = [text for d, text in pending if d >= depth]
            pending = [(d, text) for d, text in pending if d < depth]
            _close_result(levels, depth, result, claimed, cases)
        elif line and not _HEADER.match(line) and not re.match(r"^\d+\.\.\d+$", line):
            pending.append((depth, line))
    return cases


def _close_result(levels: list[_Level], depth: int, result: re.Match[str],
                  diagnostics: list[str], cases: list[KtapCase]) -> None:
    ok, _, name, directive, reason = result.groups()
    if levels[depth + 1].children == 0:  # nothing nested: a test case, not a suite
        path = [lvl.name for lvl in levels[: depth + 1]] + [(name or "").strip()]
        cases.append(KtapCase(".".join(p for p in path if p), ok == "ok",
                              directive == "SKIP", (reason or "").strip(),
                              tuple(diagnostics)))
    levels[depth].children += 1
    levels[depth + 1] = _Level()
