"""Coverage: counts gathered per machine through GCOV_PREFIX, added up, reported by lcov.

The gathering and adding up are tested with a real gcov-instrumented program (the host's
gcc and libgcov, as UML's gcov uses them) laid out as a coverage kernel is in the cache
(notes beside it, its object directory named); the kernel test runs pytest with
--umtt-coverage on the coverage kernel."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_umtt import KernelConfig
from pytest_umtt.cache import cache_root
from pytest_umtt.coverage import (
    CoverageError,
    CoverageSink,
    read_tracefile,
    summarise,
    write_report,
)
from pytest_umtt.kernel import (
    COVERAGE_NOTES,
    VARIANT_FILE,
    build_kernel,
    debian_source,
    gcov_link_problem,
    variant_location,
)
from pytest_umtt.uml.launch import GCOV_DIR, GCOV_ENVIRONMENT

PROGRAM = """\
int branch(int n)
{
	if (n > 1)
		return 2;
	return 1;
}

int main(int argc, char **argv)
{
	(void)argv;
	return branch(argc) - 1;
}
"""


def toy_kernel(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A gcov-instrumented program built in ``objdir`` from ``src``, published as a
    coverage kernel is (its notes under gcno/, its object directory in variant.json)."""
    src, objdir, published = tmp_path / "src", tmp_path / "obj", tmp_path / "kernel"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "toy.c").write_text(PROGRAM)
    (objdir / "lib").mkdir(parents=True)
    subprocess.run(["gcc", "-fprofile-arcs", "-ftest-coverage", "-c", str(src / "lib/toy.c"),
                    "-o", "lib/toy.o"], cwd=objdir, check=True)
    subprocess.run(["gcc", "-fprofile-arcs", "lib/toy.o", "-o", "linux"], cwd=objdir,
                   check=True)
    (published / COVERAGE_NOTES / "lib").mkdir(parents=True)
    shutil.copy2(objdir / "lib/toy.gcno", published / COVERAGE_NOTES / "lib/toy.gcno")
    shutil.copy2(objdir / "linux", published / "linux")
    (published / VARIANT_FILE).write_text(json.dumps({"objdir": str(objdir)}))
    return src, objdir, published / "linux"


def run_machine(kernel: Path, directory: Path, *args: str) -> None:
    """Run the program as a machine's kernel runs: in its own directory, GCOV_PREFIX set."""
    directory.mkdir()
    env = {"PATH": os.environ["PATH"], **GCOV_ENVIRONMENT}
    subprocess.run([str(kernel), *args], cwd=directory, env=env, check=False)


def test_counts_from_each_machine_add_up(tmp_path: Path) -> None:
    _src, objdir, kernel = toy_kernel(tmp_path)
    sink = CoverageSink(kernel, tmp_path / "session")
    for name, args in (("m1", ()), ("m2", ("x",)), ("m3", ("x",))):
        run_machine(kernel, tmp_path / name, *args)
        written = tmp_path / name / GCOV_DIR / objdir.relative_to("/") / "lib/toy.gcda"
        assert written.is_file()  # libgcov honours the prefix, relative to the cwd
        assert sink.harvest(name, tmp_path / name) == 1
    dump = subprocess.run(["gcov-dump", str(sink.data / "lib/toy.gcda")], capture_output=True,
                          text=True, check=True).stdout
    assert "runs=3" in dump
    assert sink.machines == 3 and sink.missed == []


def test_what_a_guest_plants_is_not_taken(tmp_path: Path) -> None:
    _src, objdir, kernel = toy_kernel(tmp_path)
    sink = CoverageSink(kernel, tmp_path / "session")
    written = tmp_path / "m1" / GCOV_DIR / objdir.relative_to("/")
    written.mkdir(parents=True)
    (written / "secret.gcda").symlink_to("/etc/passwd")
    (written / "notes.txt").write_text("not coverage")
    assert sink.harvest("m1", tmp_path / "m1") == 0
    assert sink.missed == [f"m1: no .gcda files in {written}"]
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / GCOV_DIR).symlink_to("/")  # the whole tree through a link
    assert sink.harvest("m2", tmp_path / "m2") == 0
    assert not sink.data.exists()


def test_a_kernel_without_notes_is_named(tmp_path: Path) -> None:
    kernel = tmp_path / "linux"
    kernel.write_text("")
    with pytest.raises(CoverageError, match=f"{kernel} is no coverage kernel .*umtt-kernel "
                                            f"build --coverage"):
        CoverageSink(kernel, tmp_path / "session")


def test_a_missing_lcov_names_the_package(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    src, _objdir, kernel = toy_kernel(tmp_path)
    sink = CoverageSink(kernel, tmp_path / "session")
    run_machine(kernel, tmp_path / "m1")
    sink.harvest("m1", tmp_path / "m1")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(CoverageError, match=r"needs lcov and genhtml \(Debian's lcov package\): "
                                            r"sudo apt-get install lcov"):
        write_report(sink, src, [""])


def test_no_counts_no_report(tmp_path: Path) -> None:
    src, _objdir, kernel = toy_kernel(tmp_path)
    sink = CoverageSink(kernel, tmp_path / "session")
    (tmp_path / "m1").mkdir()
    sink.harvest("m1", tmp_path / "m1")
    with pytest.raises(CoverageError, match=r"no machine left coverage counts: m1: no \.gcda"):
        write_report(sink, src, [""])


needs_lcov = pytest.mark.skipif(shutil.which("lcov") is None and not os.environ.get(
    "UMTT_REQUIRE_KERNEL"), reason="lcov is not installed (./bootstrap lcov)")


@needs_lcov
def test_the_report_has_html_and_a_summary_per_directory(tmp_path: Path) -> None:
    src, _objdir, kernel = toy_kernel(tmp_path)
    sink = CoverageSink(kernel, tmp_path / "session")
    run_machine(kernel, tmp_path / "m1")
    sink.harvest("m1", tmp_path / "m1")
    report = write_report(sink, src, ["lib/", "drivers/"])
    assert report.html.is_file()
    [(source, _lines)] = read_tracefile(report.tracefile)
    assert source == str(src / "lib/toy.c")
    lib, drivers = report.summaries
    # One run without arguments: branch()'s "return 2" is the one line not run.
    assert (lib.lines_found - lib.lines_hit, lib.functions_found, lib.functions_hit) == (1, 2, 2)
    assert lib.line().startswith("lib/: lines ")
    assert drivers.line() == "drivers/: lines - (0 of 0), functions - (0 of 0)"
    assert summarise(read_tracefile(report.tracefile), str(src) + "/", "").lines_found == (
        lib.lines_found)


COVERAGE = KernelConfig(coverage=True)


@pytest.fixture(scope="module")
def coverage_kernel(uml_kernel: Path) -> Path:
    """The coverage variant, built once (a full build of its own, with debug info) and
    cached."""
    return build_kernel(debian_source(cache_root(), print), config=COVERAGE)


def libgcov_defines_mangle_path() -> bool:
    library = subprocess.run(["gcc", "-print-file-name=libgcov.a"], capture_output=True,
                             text=True, check=True).stdout.strip()
    symbols = subprocess.run(["nm", "-g", "--defined-only", library], capture_output=True,
                             text=True, check=False).stdout
    return " T mangle_path\n" in symbols


@pytest.mark.kernel
def test_the_coverage_kernels_source_links_with_this_compilers_libgcov(
        uml_kernel: Path, tmp_path: Path) -> None:
    # gcc 12's libgcov.a (Debian 12's) defines mangle_path, as fs/seq_file.c does: the
    # coverage kernel's source renames the kernel's (data/patches-coverage), every other
    # kernel's keeps it, and a tree without the rename is refused in a second, not after
    # a near-full build.
    coverage_source, _ = variant_location(COVERAGE)
    default_source, _ = variant_location(KernelConfig())
    assert coverage_source.path != default_source.path
    assert gcov_link_problem(coverage_source.path) is None
    assert "char *seq_mangle_path(" in (coverage_source.path / "fs/seq_file.c").read_text()
    assert "char *mangle_path(" in (default_source.path / "fs/seq_file.c").read_text()
    problem = gcov_link_problem(default_source.path)
    assert (problem is not None) == libgcov_defines_mangle_path()
    if problem is not None:
        assert "libgcov.a defines mangle_path, and so does" in problem


@pytest.mark.kernel
@needs_lcov
def test_a_session_reports_the_kernel_code_its_tests_ran(
        pytester: pytest.Pytester, real_cache: Path, coverage_kernel: Path) -> None:
    pytester.makepyfile("""
        def test_sleeps(umtt_machine):
            assert umtt_machine.run("sleep 1").ok

        def test_two_machines(umtt_machine_factory):
            first, second = umtt_machine_factory(), umtt_machine_factory()
            assert first.run("cat /proc/uptime").ok and second.run("true").ok
    """)
    result = pytester.runpytest_subprocess("--umtt-coverage=kernel/time/,drivers/gpio/",
                                           "--umtt-coverage-per-test",
                                           "-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=2)
    root = pytester.path / "umtt-coverage"
    result.stdout.fnmatch_lines([
        f"umtt coverage: {root}/html/index.html (lcov: {root}/kernel.info)",
        "  kernel/time/: lines *% (* of *), functions *% (* of *)",
        "  drivers/gpio/: lines *",
    ])
    assert (root / "html" / "index.html").is_file()
    records = read_tracefile(root / "kernel.info")
    source = next(path for path, _lines in records if path.endswith("/kernel/time/hrtimer.c"))
    tree = source.removesuffix("kernel/time/hrtimer.c")
    timers = summarise(records, tree + "kernel/time/", "kernel/time/")
    assert 0 < timers.lines_hit < timers.lines_found  # sleep ran hrtimers, not all of them
    # Three machines' counts, from two workers, added up: every boot runs start_kernel once.
    main = summarise(records, tree + "init/main.c", "init/main.c")
    assert main.lines_hit > 0
    start = next(line for path, lines in records if path.endswith("/init/main.c")
                 for line in lines if line.startswith("FNDA:") and line.endswith(",start_kernel"))
    assert start == "FNDA:3,start_kernel"
    # Each test's own counts too: one boot, then two.
    per_test = (root / "tests" / "summary.txt").read_text()
    result.stdout.fnmatch_lines([f"umtt coverage per test: 2 tracefiles, their summaries in "
                                 f"{root}/tests/summary.txt"])
    for name, boots in (("test_sleeps", 1), ("test_two_machines", 2)):
        [node] = [path for path in (root / "tests").iterdir() if path.name.endswith(name)]
        assert f"::{name}: {node}/kernel.info\n  kernel/time/: lines " in per_test
        assert f"FNDA:{boots},start_kernel" in (node / "kernel.info").read_text()


def test_per_test_coverage_needs_coverage(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("--umtt-coverage-per-test")
    result.stderr.fnmatch_lines(["*--umtt-coverage-per-test splits --umtt-coverage's counts "
                                 "by test: give --umtt-coverage too*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
