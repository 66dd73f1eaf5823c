"""The sanitizer kernel (umtt-kernel build --debug, --umtt-debug-kernel) on a real kernel:
each sanitizer catches a bug planted in a small out-of-tree module (tests/data/umtt_bugs,
built against the variant with ``make M=``) or provoked through LKDTM, and the report
fails the test with the right kind, unless a marker allows it. Its runs are as
deterministic as the default kernel's."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from pytest_umtt import KernelConfig, Simulation
from pytest_umtt.cache import cache_root
from pytest_umtt.extmod import build_module
from pytest_umtt.kconfig import fragment_options
from pytest_umtt.kernel import build_kernel, debian_source
from pytest_umtt.rootfs import Rootfs

DEBUG = KernelConfig(debug=True)
BUGS = Path(__file__).parent / "data" / "umtt_bugs"
PROVOKE = ("mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug; "
           "echo {} > /sys/kernel/debug/provoke-crash/DIRECT")


# --- options (no kernel) ------------------------------------------------------------------

def test_coverage_without_lcov_is_a_usage_error_before_any_build(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile("def test_x(): pass")
    bare = pytester.path / "bin"
    bare.mkdir()
    for tool in ("gcc", "cc", "make"):  # whatever else may be looked up, but no lcov
        if found := shutil.which(tool):
            (bare / tool).symlink_to(found)
    monkeypatch.setenv("PATH", str(bare))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--umtt-coverage")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--umtt-coverage needs lcov and genhtml (Debian's lcov "
                                 "package): sudo apt-get install lcov, or ./bootstrap lcov*"])


@pytest.mark.parametrize(("args", "error"), [
    (["--umtt-debug-kernel", "--uml-kernel=/bin/true"],
     "--umtt-debug-kernel builds its own kernel: it cannot run on the kernel --uml-kernel "
     "gives (/bin/true); leave one out"),
    (["--umtt-coverage=drivers/gpio/,../etc"],
     "--umtt-coverage: '../etc' is not a directory of the kernel's source*"),
])
def test_bad_sanitizer_options_are_usage_errors(pytester: pytest.Pytester, args: list[str],
                                                error: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{error}*"])


# --- the kernel ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def debug_kernel(uml_kernel: Path) -> Path:
    """The sanitizer variant, built once (nearly a full build) and cached."""
    return build_kernel(debian_source(cache_root(), print), config=DEBUG)


@pytest.fixture(scope="module")
def bugs_module(debug_kernel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    [module] = build_module(BUGS, tmp_path_factory.mktemp("modules"), DEBUG)
    return module


@pytest.mark.kernel
def test_every_sanitizer_took(debug_kernel: Path) -> None:
    directory = debug_kernel.resolve().parent
    config = fragment_options((directory / "config").read_text())
    for option in ("CONFIG_KASAN", "CONFIG_KASAN_GENERIC", "CONFIG_KASAN_VMALLOC",
                   "CONFIG_UBSAN", "CONFIG_UBSAN_BOUNDS", "CONFIG_UBSAN_SHIFT",
                   "CONFIG_PROVE_LOCKING", "CONFIG_DEBUG_OBJECTS", "CONFIG_LKDTM"):
        assert config.get(option) == "y", option
    assert config.get("CONFIG_UBSAN_ALIGNMENT", "n") == "n"
    assert config.get("CONFIG_KFENCE", "n") == "n"
    assert json.loads((directory / "variant.json").read_text())["did_not_take"] == []


def insmod(module: Path, bug: str) -> str:
    return f"insmod /mnt/{module.name} bug={shlex.quote(bug)}"


@pytest.mark.kernel
def test_the_debug_kernel_boots_and_loads_the_module_quietly(
        debug_kernel: Path, bugs_module: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=debug_kernel, rootfs=rootfs) as sim:
        machine = sim.machine()
        machine.push(bugs_module)
        machine.run(insmod(bugs_module, "none"), check=True)
        assert "umtt_bugs" in machine.run("lsmod", check=True).output
        assert machine.splats == []


PLANTED = [
    # (how, kind, the report's first line, the planted function among the frames)
    ("module:oob", "KASAN", "BUG: KASAN: slab-out-of-bounds in umtt_bug_oob",
     "umtt_bug_oob [umtt_bugs]"),
    ("module:inversion", "lockdep", "WARNING: possible circular locking dependency detected",
     "umtt_bug_inversion [umtt_bugs]"),
    ("module:shift", "UBSAN", "UBSAN: shift-out-of-bounds in ", "umtt_bug_shift [umtt_bugs]"),
    ("lkdtm:SLAB_LINEAR_OVERFLOW", "KASAN", "BUG: KASAN: slab-out-of-bounds in "
     "lkdtm_SLAB_LINEAR_OVERFLOW", "lkdtm_SLAB_LINEAR_OVERFLOW"),
    ("lkdtm:ARRAY_BOUNDS", "UBSAN", "UBSAN: array-index-out-of-bounds in ",
     "lkdtm_ARRAY_BOUNDS"),
]


@pytest.mark.kernel
@pytest.mark.parametrize("planted", PLANTED, ids=[planted[0] for planted in PLANTED])
def test_each_sanitizer_catches_its_bug(debug_kernel: Path, bugs_module: Path, rootfs: Rootfs,
                                        planted: tuple[str, str, str, str]) -> None:
    how, kind, header, frame = planted
    source, name = how.split(":")
    with Simulation(kernel=debug_kernel, rootfs=rootfs) as sim:
        machine = sim.machine()
        machine.push(bugs_module)
        command = insmod(bugs_module, name) if source == "module" else PROVOKE.format(name)
        machine.run(command, check=True)  # the kernel survives each: a splat, no crash
        splats = machine.splats
        assert [splat.kind for splat in splats][:1] == [kind], [s.signature for s in splats]
        assert splats[0].header.text.startswith(header)
        assert splats[0].complete
        assert frame in splats[0].signature
        assert machine.run("echo still here").output.strip() == "still here"


@pytest.mark.kernel
def test_a_sanitizer_report_fails_its_test_unless_allowed(
        pytester: pytest.Pytester, real_cache: Path, debug_kernel: Path,
        bugs_module: Path) -> None:
    pytester.makepyfile(f"""
        import pytest

        def load(machine, bug):
            name = machine.push({str(bugs_module)!r})
            return machine.run(f"insmod {{name}} bug={{bug}}")

        def test_overruns_a_buffer(umtt_machine):
            assert load(umtt_machine, "oob").ok

        @pytest.mark.umtt_allow_splat("^lockdep$", reason="the inversion is planted")
        def test_inverts_locks_allowed(umtt_machine):
            assert load(umtt_machine, "inversion").ok

        def test_shifts_too_far(umtt_machine):
            assert load(umtt_machine, "shift").ok

        def test_loads_quietly(umtt_machine):
            assert load(umtt_machine, "none").ok
    """)
    result = pytester.runpytest_subprocess("--umtt-debug-kernel", "-p", "no:cacheprovider",
                                           "-v", "-rA")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["umtt: kernel *", "*variant: default + debug*"])
    result.stdout.fnmatch_lines([
        "*_ test_overruns_a_buffer _*",
        "a kernel splat on uml: KASAN: *umtt_bug_oob [[]umtt_bugs[]]* (the test itself "
        "passed)",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_shifts_too_far _*",
        "a kernel splat on uml: UBSAN: *umtt_bug_shift [[]umtt_bugs[]]* (the test itself "
        "passed)",
    ])
    result.stdout.fnmatch_lines([
        "allowed (the inversion is planted; @pytest.mark.umtt_allow_splat on *"
        "::test_inverts_locks_allowed):",
        "lockdep on uml at *",
    ])


@pytest.mark.kernel
def test_the_debug_kernel_runs_the_same_twice_for_one_seed(
        pytester: pytest.Pytester, real_cache: Path, debug_kernel: Path) -> None:
    pytester.makepyfile("""
        def test_entropy_timers_and_locks(umtt_machine):
            umtt_machine.run("head -c 16 /dev/urandom | od -An -tx1; sleep 0.5; cat /proc/loadavg")

        def test_a_lockdep_heavy_path(umtt_machine):
            umtt_machine.run("for i in 1 2 3; do mkdir -p /tmp/d$i && echo $i > /tmp/d$i/f; done; "
                    "sync; cat /proc/lockdep_stats | head -3")
    """)
    result = pytester.runpytest_subprocess("--umtt-debug-kernel", "-p", "no:cacheprovider",
                                           "--umtt-check-determinism")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["*determinism: 2 tests run twice, 0 differed*"])
