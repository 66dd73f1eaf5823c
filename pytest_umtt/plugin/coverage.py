"""--umtt-coverage: every machine of the session runs the coverage kernel, its counts are
taken as it closes (:class:`~pytest_umtt.coverage.CoverageSink`), and the session ends
with one lcov report of the kernel code its tests ran.

Where: ``<--umtt-artifacts>/coverage``, else ``umtt-coverage`` in pytest's root
directory; made anew by each session (a directory there that pytest-umtt did not make is
refused, never removed). Under xdist each worker adds up its own machines' counts
(``counts/<worker>``) and the controller adds those up and writes the report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..coverage import CoverageError, CoverageSink, Report, write_report
from ..kernel import variant_location
from .settings import Settings

COVERAGE_DIR = "umtt-coverage"
MARK = ".umtt-coverage"
"""In a coverage directory pytest-umtt made: only such a directory is replaced."""


def coverage_root(config: pytest.Config, settings: Settings) -> Path:
    """Where a session's coverage report goes."""
    if settings.artifacts is not None:
        return settings.artifacts.absolute() / "coverage"
    return config.rootpath / COVERAGE_DIR


def start_coverage(config: pytest.Config, settings: Settings) -> CoverageSink:
    """The sink this process's machines give their counts to; the controller (or a run
    without xdist) first makes the directory anew."""
    assert settings.kernel is not None and settings.coverage is not None
    root = coverage_root(config, settings)
    worker = getattr(config, "workerinput", None)
    where = root / "counts" / worker["workerid"] if worker is not None else root
    try:
        if worker is None:
            _fresh(root)
        sink = CoverageSink(settings.kernel, where)
    except CoverageError as exc:
        raise pytest.UsageError(f"--umtt-coverage: {exc}") from None
    if worker is None:
        config.pluginmanager.register(CoverageReporter(sink, settings), "umtt-coverage")
    return sink


def _fresh(root: Path) -> None:
    if root.exists() and not (root / MARK).is_file() and any(root.iterdir()):
        raise pytest.UsageError(f"--umtt-coverage: {root} exists and is not a coverage "
                                f"directory of pytest-umtt's (no {MARK}); move it away")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / MARK).write_text("made by pytest-umtt --umtt-coverage; replaced by the next run\n")


class CoverageReporter:
    """Writes the session's report when it ends and shows where it is."""

    def __init__(self, sink: CoverageSink, settings: Settings) -> None:
        self.sink = sink
        self.settings = settings
        self.report: Report | None = None
        self.error: str | None = None

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        del session
        try:
            self._add_workers()
            source = variant_location(self.settings.kconfig)[0].path
            directories = self.settings.coverage or ("",)
            self.report = write_report(self.sink, source, directories)
        except (CoverageError, OSError) as exc:
            self.error = str(exc)

    def _add_workers(self) -> None:
        """xdist: each worker's added-up counts into the session's."""
        for counts in sorted((self.sink.directory / "counts").glob("*/data")):
            shutil.copytree(counts, self.sink.directory / "incoming")
            self.sink.add(self.sink.directory / "incoming")

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        write = terminalreporter.write_line
        if self.report is None:
            write(f"umtt coverage: no report: {self.error}")
            return
        write(f"umtt coverage: {self.report.html} (lcov: {self.report.tracefile})")
        for summary in self.report.summaries:
            write(f"  {summary.line()}")
        for missed in self.sink.missed[:10]:
            write(f"  no counts from {missed}")
