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

from ..coverage import (
    CoverageError,
    CoverageSink,
    Report,
    SplitSink,
    write_report,
    write_tracefile,
)
from ..kernel import variant_location
from ..summary import node_filename
from .settings import Settings

COVERAGE_DIR = "umtt-coverage"
PER_TEST_DIR = "tests"
NODEID_FILE = "nodeid"
PER_TEST_SUMMARY = "summary.txt"
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


def node_sink(config: pytest.Config, settings: Settings, session: CoverageSink,
              nodeid: str) -> SplitSink:
    """The sink for the machines of node ``nodeid`` (a test, or a module's shared
    simulation): the session's, and ``tests/<node>`` of the coverage directory (one
    per node whatever the xdist worker)."""
    name = node_filename(nodeid) or "node"
    directory = coverage_root(config, settings) / PER_TEST_DIR / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / NODEID_FILE).write_text(nodeid + "\n")
    return SplitSink(session, CoverageSink(session.kernel, directory))


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
        self.per_test: Path | None = None
        """The per-test summary file, once written (``--umtt-coverage-per-test``)."""
        self.per_test_count = 0

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        del session
        try:
            self._add_workers()
            source = variant_location(self.settings.kconfig)[0].path
            directories = self.settings.coverage or ("",)
            self.report = write_report(self.sink, source, directories)
            if self.settings.coverage_per_test:
                self._write_per_test(source, directories)
        except (CoverageError, OSError) as exc:
            self.error = str(exc)

    def _write_per_test(self, source: Path, directories: tuple[str, ...]) -> None:
        """Each node's tracefile, and one summary file: its lines per directory."""
        root = self.sink.directory / PER_TEST_DIR
        lines: list[str] = []
        for node in sorted(path for path in root.glob("*") if path.is_dir()):
            nodeid = (node / NODEID_FILE).read_text().strip()
            sink = CoverageSink(self.sink.kernel, node)
            try:
                tracefile, summaries, _ = write_tracefile(sink, source, directories)
            except CoverageError as exc:
                lines.append(f"{nodeid}: no report: {exc}")
                continue
            lines += [f"{nodeid}: {tracefile}", *(f"  {s.line()}" for s in summaries)]
            self.per_test_count += 1
        self.per_test = root / PER_TEST_SUMMARY
        self.per_test.write_text("\n".join(lines) + "\n")

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
        if self.per_test is not None:
            write(f"umtt coverage per test: {self.per_test_count} tracefiles, their "
                  f"summaries in {self.per_test}")
        for missed in self.sink.missed[:10]:
            write(f"  no counts from {missed}")
