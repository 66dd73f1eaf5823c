"""Kernel coverage: what the tests ran of a gcov kernel, as an lcov report.

UML's gcov (``CONFIG_GCOV``, ``data/coverage.config``) is the host's libgcov linked into
the kernel's process: when that process exits (after a clean halt, not a kill), libgcov
writes one ``.gcda`` file per object file, at the object's absolute path in the object
directory the kernel was built in; with ``GCOV_PREFIX`` set, under that prefix instead
(the absolute path appended to it; a relative prefix is taken from the process's working
directory). A confined machine can write its own directory only, and the object
directory is shared by every variant, so machines of a coverage session run with
``GCOV_PREFIX=.gcov``: the data lands in ``<machine directory>/.gcov/<object
directory>/...``, which the guest sees at ``/mnt/.gcov`` and could write too, so it is
read as hostile input (regular files named ``*.gcda`` only, bounded in number and size).

A :class:`CoverageSink` gathers each machine's data as the machine closes, adding it up
(``gcov-tool merge``) in a directory of the session's; at the end :func:`write_report`
puts the compiler's notes kept beside the kernel (``gcno/``, kernel.py) next to the
counts, captures them with lcov and writes HTML (genhtml) and one summary line per
directory asked for. lcov is Debian's ``lcov`` package: without it, the report names the
package to install.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UmttError
from .kernel import coverage_notes
from .uml.launch import GCOV_DIR

MAX_GCDA_FILES = 20_000
"""More .gcda files than a whole-kernel build has objects (~3,000 for ARCH=um defconfig
and pytest-umtt's fragment)."""
MAX_GCDA_BYTES = 512 << 20
"""Bytes of .gcda files taken from one machine."""
LCOV_PACKAGE = "lcov"
TOOL_TIMEOUT = 600.0
"""Wall seconds an lcov, genhtml or gcov-tool run may take before it is called stuck."""


class CoverageError(UmttError):
    """Coverage data could not be gathered or reported; the message says what and how."""


@dataclass
class CoverageSink:
    """Where a session's coverage counts add up: ``directory/data`` holds the merged
    .gcda files at their paths under the kernel's object directory."""

    kernel: Path
    directory: Path
    machines: int = 0
    """Machines whose counts were taken."""
    missed: list[str] = field(default_factory=list)
    """Machines that left no counts, and why."""

    def __post_init__(self) -> None:
        found = coverage_notes(self.kernel)
        if found is None:
            raise CoverageError(f"{self.kernel} is no coverage kernel (no gcno notes or "
                                f"object directory beside it); build one with umtt-kernel "
                                f"build --coverage")
        self.notes, self.objdir = found
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    def harvest(self, machine: str, machine_dir: Path) -> int:
        """Add the counts a machine's kernel wrote at exit (in ``machine_dir``); the
        number of .gcda files taken. What goes wrong is kept in :attr:`missed` for the
        report: a test does not fail for its coverage."""
        try:
            return self._harvest(machine, machine_dir)
        except (CoverageError, OSError) as exc:
            self.missed.append(f"{machine}: {exc}")
            return 0

    def _harvest(self, machine: str, machine_dir: Path) -> int:
        written = machine_dir / GCOV_DIR / self.objdir.relative_to(self.objdir.anchor)
        incoming = self.directory / "incoming"
        shutil.rmtree(incoming, ignore_errors=True)
        count = _copy_counts(written, incoming)
        if count == 0:
            self.missed.append(f"{machine}: no .gcda files in {written}")
            return 0
        self.add(incoming)
        self.machines += 1
        return count

    def add(self, incoming: Path) -> None:
        """Add the counts in ``incoming`` (a directory of .gcda files at their paths
        under the object directory, consumed) to :attr:`data`."""
        if not self.data.is_dir():
            incoming.rename(self.data)
            return
        merged = self.directory / "merged"
        shutil.rmtree(merged, ignore_errors=True)
        _run(["gcov-tool", "merge", "-o", str(merged), str(self.data), str(incoming)],
             "adding up coverage counts", "gcc")
        if not merged.is_dir():
            raise CoverageError(f"gcov-tool merge wrote nothing for {incoming}")
        shutil.rmtree(self.data)
        merged.rename(self.data)
        shutil.rmtree(incoming, ignore_errors=True)


@dataclass
class SplitSink:
    """A machine's counts to the session's sink and to one test's as well."""

    session: CoverageSink
    test: CoverageSink

    @property
    def missed(self) -> list[str]:
        """Machines that left no counts, and why (the session's record)."""
        return self.session.missed

    def harvest(self, machine: str, machine_dir: Path) -> int:
        """Take the counts into both sinks (each copies them from ``machine_dir``)."""
        self.test.harvest(machine, machine_dir)
        return self.session.harvest(machine, machine_dir)


def _copy_counts(source: Path, target: Path) -> int:
    """Copy the regular ``*.gcda`` files under ``source`` (never through a link) to the
    same paths under ``target``, within :data:`MAX_GCDA_FILES` and :data:`MAX_GCDA_BYTES`."""
    count = total = 0
    for relative, size in _gcda_files(source):
        count, total = count + 1, total + size
        if count > MAX_GCDA_FILES or total > MAX_GCDA_BYTES:
            raise CoverageError(f"{source}: more than {MAX_GCDA_FILES} .gcda files or "
                                f"{MAX_GCDA_BYTES >> 20} MiB: not what a kernel writes")
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / relative, target / relative, follow_symlinks=False)
    return count


def _gcda_files(root: Path) -> Iterator[tuple[Path, int]]:
    """``(path relative to root, size)`` of each regular .gcda file under ``root``."""
    if root.is_symlink() or not root.is_dir():
        return
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            path = Path(directory) / name
            info = path.lstat()
            if name.endswith(".gcda") and stat.S_ISREG(info.st_mode):
                yield path.relative_to(root), info.st_size


@dataclass(frozen=True, slots=True)
class Summary:
    """Lines and functions of one directory: found and hit."""

    directory: str
    lines_found: int = 0
    lines_hit: int = 0
    functions_found: int = 0
    functions_hit: int = 0

    def line(self) -> str:
        """``drivers/gpio/: lines 45.2% (123 of 272), functions 50.0% (10 of 20)``."""
        return (f"{self.directory or 'kernel'}: lines {_percent(self.lines_hit, self.lines_found)}"
                f" ({self.lines_hit} of {self.lines_found}), functions "
                f"{_percent(self.functions_hit, self.functions_found)} ({self.functions_hit} "
                f"of {self.functions_found})")


def _percent(hit: int, found: int) -> str:
    return f"{100 * hit / found:.1f}%" if found else "-"


@dataclass(frozen=True, slots=True)
class Report:
    """What :func:`write_report` wrote: the lcov tracefile, the HTML index, and one
    summary per directory asked for."""

    tracefile: Path
    html: Path
    summaries: tuple[Summary, ...]


def write_report(sink: CoverageSink, source_tree: Path, directories: Sequence[str]) -> Report:
    """The lcov report of what ``sink`` gathered: ``kernel.info`` (every file), HTML of
    the ``directories`` asked for (``""``: the whole kernel) and their summaries."""
    tracefile, summaries, records = write_tracefile(sink, source_tree, directories)
    prefix = f"{source_tree}/"
    shown = sink.directory / "shown.info"
    _extract(records, [prefix + wanted for wanted in directories], shown)
    html = sink.directory / "html"
    _run(["genhtml", "--quiet", "--prefix", str(source_tree), "--output-directory", str(html),
          str(shown)], "genhtml", LCOV_PACKAGE)
    return Report(tracefile, html / "index.html", summaries)


def write_tracefile(sink: CoverageSink, source_tree: Path, directories: Sequence[str]
                    ) -> tuple[Path, tuple[Summary, ...], list[Record]]:
    """``kernel.info`` in the sink's directory (lcov's capture of what it gathered), the
    ``directories``' summaries, and the tracefile's records."""
    if not sink.data.is_dir():
        raise CoverageError("no machine left coverage counts: "
                            + ("; ".join(sink.missed) or "no machine ran"))
    ensure_lcov()
    shutil.copytree(sink.notes, sink.data, dirs_exist_ok=True)
    tracefile = sink.directory / "kernel.info"
    _run(["lcov", "--quiet", "--capture", "--directory", str(sink.data), "--base-directory",
          str(sink.objdir), "--output-file", str(tracefile)], "lcov --capture", LCOV_PACKAGE)
    records = read_tracefile(tracefile)
    prefix = f"{source_tree}/"
    summaries = tuple(summarise(records, prefix + wanted, wanted) for wanted in directories)
    return tracefile, summaries, records


def ensure_lcov() -> None:
    """Raise a CoverageError naming the package if lcov's tools are missing."""
    missing = [tool for tool in ("lcov", "genhtml") if shutil.which(tool) is None]
    if missing:
        raise CoverageError(f"--umtt-coverage needs {' and '.join(missing)} (Debian's "
                            f"{LCOV_PACKAGE} package): sudo apt-get install {LCOV_PACKAGE}, "
                            f"or ./bootstrap {LCOV_PACKAGE}")


def _run(command: list[str], what: str, package: str) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                              check=False)
    except FileNotFoundError:
        raise CoverageError(f"{what}: no {command[0]} (Debian's {package} package)") from None
    except subprocess.TimeoutExpired:
        raise CoverageError(f"{what} took more than {TOOL_TIMEOUT:g} s: "
                            f"{' '.join(command)}") from None
    if done.returncode != 0:
        raise CoverageError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n"
                            f"{(done.stderr or done.stdout).strip()[-1500:]}")


Record = tuple[str, list[str]]
"""One source file's record in an lcov tracefile: its path (SF:) and its lines."""


def read_tracefile(path: Path) -> list[Record]:
    """The records of an lcov tracefile, each ``(source path, its lines)``."""
    records: list[Record] = []
    current: list[str] = []
    source = ""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("SF:"):
            source, current = line[3:], []
        elif line == "end_of_record":
            records.append((source, current))
        else:
            current.append(line)
    return records


def summarise(records: Sequence[Record], prefix: str, name: str) -> Summary:
    """Lines and functions found and hit in the files under ``prefix``, counted from
    the records' own data (``DA:line,count``, ``FNDA:count,name``): lcov writes the
    LF/LH totals or not, by version."""
    lines_found = lines_hit = functions_found = functions_hit = 0
    for source, lines in records:
        if not source.startswith(prefix):
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key == "DA":
                lines_found += 1
                lines_hit += _count(value.split(",")[1:2]) > 0
            elif key == "FNDA":
                functions_found += 1
                functions_hit += _count(value.split(",")[:1]) > 0
    return Summary(name, lines_found, lines_hit, functions_found, functions_hit)


def _count(fields: list[str]) -> int:
    return int(fields[0]) if fields and fields[0].isdigit() else 0


def _extract(records: Sequence[Record], prefixes: Sequence[str], target: Path) -> None:
    """A tracefile of the records under any of ``prefixes``."""
    with target.open("w") as out:
        for source, lines in records:
            if any(source.startswith(prefix) for prefix in prefixes):
                out.write("\n".join([f"SF:{source}", *lines, "end_of_record"]) + "\n")
