"""Splats: kernel reports the kernel survives fail the test they appear in.

Parsing is tested on real console captures (tests/data/splats-*.log, saved from real
kernels provoking each report through LKDTM); the plugin through pytester on a real
kernel with LKDTM (the default kernel's fragment has it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_umtt.signature import first_trace, mask, parse_frame, signature
from pytest_umtt.summary import Summary
from pytest_umtt.uml.console import Console, ConsoleLine
from pytest_umtt.uml.splats import MAX_SPLAT_LINES, Splat, SplatScanner

DATA = Path(__file__).parent / "data"
PROVOKE = ("mountpoint -q /sys/kernel/debug || mount -t debugfs debugfs /sys/kernel/debug; "
           "echo {} > /sys/kernel/debug/provoke-crash/DIRECT")
"""A shell command that makes LKDTM provoke a report (drivers/misc/lkdtm/core.c)."""


def scan(text: str, time_ns: int = 7) -> list[Splat]:
    scanner = SplatScanner("m")
    for line in text.splitlines():
        scanner.feed(ConsoleLine(time_ns, line))
    return scanner.splats


def capture(name: str, tmp_path: Path) -> list[Splat]:
    """The splats of a saved console log, fed as a machine feeds its console (bytes, with
    one virtual time: it stamps a kernel's run as a whole)."""
    console = Console(tmp_path / "uml.console.log")
    console.feed((DATA / name).read_bytes(), 1_234_000_000)
    console.close()
    return console.splats


# --- signatures ---------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "frame"), [
    (" [<6005a8b2>] lkdtm_WARNING+0x1a/0x30", "lkdtm_WARNING"),
    (" [<6005a8b2>] ? _printk+0x10/0x20", "_printk (unsure)"),
    ("  do_one_initcall.constprop.0+0x5c/0x2a0", "do_one_initcall"),
    ("  veth_xmit+0x13/0x40 [veth]", "veth_xmit [veth]"),
    ("[   12.345678] [    T1]  ? kthread+0x10/0x20", "kthread (unsure)"),
    ("kmemleak:     kmalloc_trace+0x2d/0x90", None),  # kmemleak's prefix: see the scanner
    ("WARNING: CPU: 0 PID: 1 at lib/x.c:3 f+0x1/0x2", None),
    ("BUG: KASAN: slab-out-of-bounds in f+0x1/0x2", None),
])
def test_frames_are_read_as_the_kernel_prints_them(line: str, frame: str | None) -> None:
    parsed = parse_frame(line)
    shown = None if parsed is None else str(parsed) + ("" if parsed.reliable else " (unsure)")
    assert shown == frame


def test_a_signature_is_the_kind_and_first_frames_after_the_reporting_machinery() -> None:
    trace = [" [<1>] ? _printk+0x1/0x2", " [<2>] dump_stack_lvl+0x1/0x2",
             " [<3>] __warn+0x1/0x2", " [<4>] warn_slowpath_fmt+0x1/0x2",
             " [<5>] my_probe.isra.0+0x11/0x80 [mydrv]", " [<6>] really_probe+0x1/0x2",
             " [<7>] ? stale+0x1/0x2", " [<8>] driver_probe_device+0x1/0x2",
             " [<9>] bus_for_each_drv+0x1/0x2", " [<a>] __device_attach+0x1/0x2",
             " [<b>] device_initial_probe+0x1/0x2", "after the trace"]
    assert signature("WARNING", ["WARNING: CPU: 0 PID: 7 at x.c:1", "Call Trace:", *trace]) == (
        "WARNING: my_probe [mydrv]:really_probe:driver_probe_device:bus_for_each_drv:"
        "__device_attach")
    assert [str(f) for f in first_trace(trace)][:2] == ["dump_stack_lvl", "__warn"]


def test_a_report_without_a_trace_is_known_by_its_masked_first_line() -> None:
    assert signature("kmemleak", ["kmemleak: 3 new suspected memory leaks (see x)"]) == (
        "kmemleak: kmemleak: N new suspected memory leaks (see x)")
    assert mask("refcount_t: at 0xffff88800a1b2c3d pid 123") == "refcount_t: at N pid N"


# --- the scanner: bounds and hostile input ------------------------------------------------

WARN_UML_ORDER = """\
------------[ cut here ]------------
WARNING: CPU: 0 PID: 35 at lib/refcount.c:25 refcount_warn_saturate+0x9d/0x130
refcount_t: addition on 0; use-after-free.
Modules linked in:
Call Trace:
 [<60123456>] dump_stack_lvl+0x50/0x80
 [<60123457>] __warn+0x10c/0x1e0
 [<60123459>] refcount_warn_saturate+0x9d/0x130
 [<6012345a>] my_put+0x40/0x80
---[ end trace 0000000000000000 ]---
"""


def test_refcount_message_and_its_warning_are_one_report_in_either_order() -> None:
    uml_order = scan("before\n" + WARN_UML_ORDER + "after\n")
    lines = WARN_UML_ORDER.splitlines()
    message_first = scan("\n".join([lines[0], lines[2], lines[1], *lines[3:]]))
    for found in (uml_order, message_first):
        assert [(s.kind, s.signature, s.complete) for s in found] == [
            ("refcount", "refcount: my_put", True)]
        assert found[0].lines[0].text == lines[0]  # from "cut here"
        assert found[0].lines[-1].text.startswith("---[ end trace")


def test_a_report_that_never_ends_is_cut_and_the_next_one_is_still_seen() -> None:
    endless = "WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2\n" + "filler\n" * 100_000
    found = scan(endless + WARN_UML_ORDER)
    assert [s.kind for s in found] == ["WARNING", "refcount"]
    assert len(found[0].lines) == MAX_SPLAT_LINES
    assert found[0].truncated and not found[0].complete
    assert "(cut at 400 lines)" in found[0].render()


def test_output_stamped_later_is_not_part_of_a_report() -> None:
    scanner = SplatScanner("m")
    scanner.feed(ConsoleLine(5, "INFO: task sh:40 blocked for more than 20 seconds."))
    scanner.feed(ConsoleLine(5, "      Not tainted 6.12.118 #1"))
    scanner.feed(ConsoleLine(9, "an unrelated line, a run later"))
    [splat] = scanner.splats
    assert [line.text for line in splat.lines][-1] == "      Not tainted 6.12.118 #1"
    assert not splat.complete and "its end was not seen" in splat.render()


def test_a_huge_line_costs_what_a_short_one_does_and_is_shown_cut() -> None:
    found = scan("WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2 " + "x" * 2_000_000 + "\n"
                 + "---[ end trace 0000000000000000 ]---\n")
    [splat] = found
    assert splat.complete
    assert max(map(len, splat.render().splitlines())) < 400


@pytest.mark.parametrize(("line", "crash", "kind"), [
    ("BUG: KASAN: slab-out-of-bounds in f+0x1/0x2", None, "KASAN"),
    ("BUG: KFENCE: out-of-bounds read in f+0x1/0x2", None, "KFENCE"),
    ("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:40]", None, "soft lockup"),
    ("BUG: sleeping function called from invalid context at x.c:1", None, "BUG"),
    ("BUG: failure at drivers/misc/lkdtm/bugs.c:92/lkdtm_BUG()!", "kernel BUG", None),
    ("BUG: kernel NULL pointer dereference, address: 0000000000000000", "kernel BUG", None),
    ("Kernel panic - not syncing: BUG!", "kernel panic", None),
    ("UBSAN: array-index-out-of-bounds in x.c:3:9", None, "UBSAN"),
    ("rcu: INFO: rcu_sched self-detected stall on CPU", None, "RCU stall"),
    ("kmemleak: 2 new suspected memory leaks (see /sys/kernel/debug/kmemleak)", None,
     "kmemleak"),
    ("WARNING: possible circular locking dependency detected", None, "lockdep"),
    ("a driver says WARNING: CPU: 0 PID: 1 at x.c:1 mid-line", None, None),
])
def test_the_console_tells_crashes_from_splats(tmp_path: Path, line: str, crash: str | None,
                                               kind: str | None) -> None:
    console = Console(tmp_path / "m.console.log")
    console.feed(f"{line}\n".encode(), 3)
    assert (console.crash[0] if console.crash else None) == crash
    assert [splat.kind for splat in console.splats] == ([kind] if kind else [])
    assert all(splat.machine == "m" for splat in console.splats)
    console.close()


# --- real captures ------------------------------------------------------------------------

LKDTM_TAIL = "lkdtm_do_action:direct_entry:full_proxy_write:vfs_write"


def test_lkdtm_reports_from_the_default_kernel(tmp_path: Path) -> None:
    """The default kernel's console from boot through LKDTM's WARNING, WARNING_MESSAGE,
    REFCOUNT_INC_OVERFLOW and REFCOUNT_DEC_ZERO: four whole reports, none from the boot."""
    found = capture("splats-lkdtm-6.12.log", tmp_path)
    assert [(s.kind, s.signature, s.complete, len(s.lines)) for s in found] == [
        ("WARNING", f"WARNING: lkdtm_WARNING:{LKDTM_TAIL}", True, 40),
        ("WARNING", f"WARNING: lkdtm_WARNING_MESSAGE:{LKDTM_TAIL}", True, 42),
        ("refcount", f"refcount: lkdtm_REFCOUNT_INC_OVERFLOW:{LKDTM_TAIL}", True, 48),
        ("refcount", f"refcount: lkdtm_REFCOUNT_DEC_ZERO:{LKDTM_TAIL}", True, 47),
    ]
    for splat in found:
        assert splat.machine == "uml"
        assert splat.lines[0].text == "------------[ cut here ]------------"
        assert splat.lines[-1].text == "---[ end trace 0000000000000000 ]---"
        assert splat.header.text.startswith("WARNING: CPU: 0 PID: ")
        assert splat.time_ns == 1_234_000_000 and splat.time == 1.234
    assert "Warning message trigger count: 2" in [line.text for line in found[1].lines]
    assert found[2].lines[2].text == "refcount_t: saturated; leaking memory."
    shown = found[0].render().splitlines()
    assert shown[:3] == ["WARNING on uml at 1.234000000 s",
                         f"signature: WARNING: lkdtm_WARNING:{LKDTM_TAIL}",
                         "[1.234000000 s] ------------[ cut here ]------------"]


DEBUG_CAPTURES = {
    # Each console from LKDTM's action on, on a capture kernel: the default fragment plus
    # KASAN, UBSAN, PROVE_LOCKING, DETECT_HUNG_TASK (20 s), DEBUG_ATOMIC_SLEEP and
    # DEBUG_KMEMLEAK. Its UBSAN flags misaligned accesses all over UML (UBSAN_ALIGNMENT:
    # UML lacks HAVE_EFFICIENT_UNALIGNED_ACCESS), so reports come with others around them
    # and, once, inside them (a UBSAN report from print_modules() within a WARNING).
    "warning-in-ubsan-kernel": [
        ("WARNING", f"WARNING: lkdtm_WARNING:{LKDTM_TAIL}", 67),
        ("UBSAN", "UBSAN: print_modules:__warn:warn_slowpath_fmt:lkdtm_WARNING:lkdtm_do_action",
         73),
    ],
    "kasan-slab-out-of-bounds": [
        ("KASAN", f"KASAN: lkdtm_SLAB_LINEAR_OVERFLOW:{LKDTM_TAIL}", 103),
    ],
    "kasan-use-after-free": [
        ("KASAN", f"KASAN: lkdtm_READ_AFTER_FREE:{LKDTM_TAIL}", 124),
    ],
    "ubsan-array-bounds": [
        ("UBSAN", f"UBSAN: lkdtm_ARRAY_BOUNDS:{LKDTM_TAIL}", 53),
    ],
    "hung-task": [
        ("UBSAN", "UBSAN: watchdog:kthread:new_thread_handler", 44),
        ("hung task", f"hung task: lkdtm_HUNG_TASK:{LKDTM_TAIL}", 49),
        ("UBSAN", "UBSAN: watchdog:kthread:new_thread_handler", 49),
    ],
    "lockdep-invalid-wait-context": [  # SPINLOCKUP returns to user space holding a lock
        ("BUG", "BUG: __fput:____fput:task_work_run:interrupt_end:userspace", 44),
        ("UBSAN", "UBSAN: do_coredump:get_signal:do_signal:interrupt_end:userspace", 55),
        ("lockdep", "lockdep: acct_collect:do_exit:sys_exit_group:get_signal:do_signal", 75),
        ("BUG", "BUG: do_task_dead:make_task_dead:sys_exit_group:get_signal:do_signal", 62),
        ("UBSAN", "UBSAN: print_modules:__schedule_bug:__schedule:do_task_dead:make_task_dead",
         73),
    ],
}


@pytest.mark.parametrize("name", DEBUG_CAPTURES)
def test_sanitizer_and_debug_reports_from_a_capture_kernel(tmp_path: Path, name: str) -> None:
    console = Console(tmp_path / "uml.console.log")
    console.feed((DATA / f"splats-debug-6.12-{name}.log").read_bytes(), 5)
    console.close()
    assert console.crash is None  # the kernel went on after every one of them
    found = console.splats
    assert [(s.kind, s.signature, len(s.lines)) for s in found] == DEBUG_CAPTURES[name]
    assert all(splat.complete for splat in found)
    for splat in found:
        opening = "===" if splat.kind in ("KASAN", "lockdep") else "---"
        assert splat.lines[0].text.startswith(opening) or splat.lines[0] is splat.header
    if name.startswith("kasan"):
        assert found[0].lines[0].text == found[0].lines[-1].text == "=" * 66


def test_a_crash_has_a_signature_too(tmp_path: Path) -> None:
    """LKDTM's BUG on the default kernel: UML's BUG() prints and panics (a crash, not a
    splat); the same signature function names it. The noreturn call to panic() leaves a
    return address at the start of the next function (lkdtm_PANIC+0x0): wrong by name,
    the same every time."""
    console = Console(tmp_path / "uml.console.log")
    console.feed((DATA / "crash-lkdtm-bug-6.12.log").read_bytes(), 5)
    console.close()
    assert console.crash is not None and console.crash[0] == "kernel BUG"
    assert console.splats == []
    after = [line.text for line in console.lines]
    assert signature("kernel BUG", after[after.index(console.crash[1].text):]) == (
        f"kernel BUG: lkdtm_PANIC:{LKDTM_TAIL}")


def test_the_summary_counts_splats_by_signature() -> None:
    summary = Summary(simulations=2, virtual_ns=1, wall_seconds=1.0)
    summary.splats_failed = {"WARNING: f": ["a.py::x", "a.py::y", "a.py::y"]}
    summary.splats_allowed = {"refcount: g": ["a.py::z"]}
    assert summary.lines()[1:] == [
        "kernel splats: 3 failed 2 tests, 1 allowed",
        "  failed 3x WARNING: f (first in a.py::x, and others)",
        "  allowed 1x refcount: g (first in a.py::z)",
    ]
    summary.splats_failed = {}
    assert summary.lines()[1] == "kernel splats: 1 allowed"


# --- the plugin ---------------------------------------------------------------------------

def test_an_allowance_without_a_reason_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.umtt_allow_splat("WARNING")
        def test_x(): pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test_x: @pytest.mark.umtt_allow_splat('WARNING') needs a "
                                 "reason: reason=\"why this splat may pass\"*"])


def test_a_bad_pattern_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--umtt-allow-splat=(")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--umtt-allow-splat: '(' is not a regular expression*"])


@pytest.fixture
def lkdtm_args(kernel_args: list[str], uml_kernel: Path) -> list[str]:
    """Arguments for a child run on a kernel with LKDTM (its config beside it says)."""
    config = uml_kernel.resolve().parent / "config"
    if not (config.is_file() and "CONFIG_LKDTM=y" in config.read_text().splitlines()):
        message = f"{uml_kernel} was built without CONFIG_LKDTM (see {config})"
        if os.environ.get("UMTT_REQUIRE_KERNEL"):
            pytest.fail(message)
        pytest.skip(message)
    return kernel_args


@pytest.mark.kernel
def test_a_test_that_passes_but_warns_fails_with_the_splat(pytester: pytest.Pytester,
                                                           lkdtm_args: list[str]) -> None:
    pytester.makepyfile(f"""
        PROVOKE = {PROVOKE!r}

        def test_warns(umtt_machine):
            assert umtt_machine.run(PROVOKE.format("WARNING")).ok

        def test_fails_and_warns(umtt_machine):
            umtt_machine.run(PROVOKE.format("WARNING_MESSAGE"))
            assert False, "its own failure"

        def test_quiet(umtt_machine):
            assert umtt_machine.run("true").ok
    """)
    result = pytester.runpytest_subprocess(*lkdtm_args, "-v", "--junitxml=report.xml")
    result.assert_outcomes(passed=1, failed=2)
    junit = (pytester.path / "report.xml").read_text()  # signatures for CI's triage
    assert junit.count('name="umtt_splats"') == 2
    assert "WARNING: lkdtm_WARNING_MESSAGE:lkdtm_do_action:" in junit
    result.stdout.fnmatch_lines([
        "*::test_warns FAILED*",
        "*::test_fails_and_warns FAILED*",
        "*::test_quiet PASSED*",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_warns _*",
        "a kernel splat on uml: WARNING: lkdtm_WARNING:* (the test itself passed)",
        "",
        "WARNING on uml at *.* s",
        "signature: WARNING: lkdtm_WARNING:lkdtm_do_action:direct_entry:full_proxy_write:*",
        "[[]*.* s[]] ------------[[] cut here []]------------",
        "[[]*.* s[]] WARNING: CPU: 0 PID: * at drivers/misc/lkdtm/bugs.c:* lkdtm_WARNING*",
        "*[[]*.* s[]] ---[[] end trace * []]---",
        "a known splat may pass: @pytest.mark.umtt_allow_splat(PATTERN, reason=...)*",
    ])
    result.stdout.fnmatch_lines([
        "*_ test_fails_and_warns _*",
        "*AssertionError: its own failure*",
        "*- umtt splats -*",
        "a kernel splat on uml: WARNING: lkdtm_WARNING_MESSAGE:* (the test failed on its own "
        "too)",
        "signature: WARNING: lkdtm_WARNING_MESSAGE:lkdtm_do_action:*",
        "*Warning message trigger count: *",
    ])
    result.stdout.fnmatch_lines([
        "kernel splats: 2 failed 2 tests",
        "  failed 1x WARNING: lkdtm_WARNING*:lkdtm_do_action:* (first in *::test_*)",
        "  failed 1x WARNING: lkdtm_WARNING*:lkdtm_do_action:* (first in *::test_*)",
    ])


@pytest.mark.kernel
def test_allowed_splats_pass_and_are_counted(pytester: pytest.Pytester,
                                             lkdtm_args: list[str]) -> None:
    pytester.makepyfile(f"""
        import pytest

        PROVOKE = {PROVOKE!r}

        @pytest.mark.umtt_allow_splat("^refcount$", reason="the refcount test overflows it")
        def test_marked(umtt_machine):
            assert umtt_machine.run(PROVOKE.format("REFCOUNT_INC_OVERFLOW")).ok

        def test_by_option(umtt_machine):
            assert umtt_machine.run(PROVOKE.format("WARNING_MESSAGE")).ok

        def test_not_covered(umtt_machine):
            assert umtt_machine.run(PROVOKE.format("WARNING")).ok
    """)
    # Under xdist: the summary counts what the workers' reports carry.
    result = pytester.runpytest_subprocess(*lkdtm_args, "-rA", "-n", "2",
                                           "--umtt-allow-splat=lkdtm_WARNING_MESSAGE")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*- umtt splats (allowed) -*",
        "allowed (the refcount test overflows it; @pytest.mark.umtt_allow_splat on *"
        "::test_marked):",
        "refcount on uml at *",
        "signature: refcount: lkdtm_REFCOUNT_INC_OVERFLOW:*",
        "*refcount_t: saturated; leaking memory.",
    ])
    result.stdout.fnmatch_lines([
        "kernel splats: 1 failed 1 test, 2 allowed",
        "  failed 1x WARNING: lkdtm_WARNING:* (first in *::test_not_covered)",
        "  allowed 1x *",
        "  allowed 1x *",
    ])


@pytest.mark.kernel
def test_a_module_machine_blames_each_test_for_its_own_splats(pytester: pytest.Pytester,
                                                             lkdtm_args: list[str]) -> None:
    pytester.makepyfile(f"""
        PROVOKE = {PROVOKE!r}

        def test_one(umtt_module_machine):
            assert umtt_module_machine.run("true").ok

        def test_two(umtt_module_machine):
            assert umtt_module_machine.run(PROVOKE.format("WARNING")).ok

        def test_three(umtt_module_machine):
            assert umtt_module_machine.run("sleep 1").ok
    """)
    result = pytester.runpytest_subprocess(*lkdtm_args, "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*::test_one PASSED*", "*::test_two FAILED*",
                                 "*::test_three PASSED*", "kernel splats: 1 failed 1 test"])


@pytest.mark.kernel
def test_a_splat_during_teardown_fails_the_teardown(pytester: pytest.Pytester,
                                                    lkdtm_args: list[str]) -> None:
    pytester.makepyfile(f"""
        import pytest

        PROVOKE = {PROVOKE!r}

        @pytest.fixture
        def noisy_on_removal(umtt_machine):
            yield umtt_machine
            umtt_machine.run(PROVOKE.format("WARNING"))

        def test_x(noisy_on_removal):
            assert noisy_on_removal.run("true").ok
    """)
    result = pytester.runpytest_subprocess(*lkdtm_args)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_x*",
        "a kernel splat on uml: WARNING: lkdtm_WARNING:* (after the test, during its "
        "teardown)",
        "signature: WARNING: lkdtm_WARNING:*",
    ])


@pytest.mark.kernel
def test_a_crash_still_raises_machine_crashed(pytester: pytest.Pytester,
                                              lkdtm_args: list[str]) -> None:
    pytester.makepyfile(f"""
        PROVOKE = {PROVOKE!r}

        def test_bug(umtt_machine):
            umtt_machine.run(PROVOKE.format("BUG"))
    """)
    result = pytester.runpytest_subprocess(*lkdtm_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*MachineCrashed: uml: kernel BUG: BUG: failure at "
                                 "drivers/misc/lkdtm/bugs.c:*"])
    assert "kernel splats" not in result.stdout.str()


@pytest.mark.kernel
def test_a_kselftest_that_passes_but_warns_fails(pytester: pytest.Pytester,
                                                 lkdtm_args: list[str]) -> None:
    tree = pytester.path / "tree"
    (tree / "lkdtm").mkdir(parents=True)
    for name, action in (("warns.sh", "WARNING"), ("quiet.sh", None)):
        script = tree / "lkdtm" / name
        script.write_text("#!/bin/sh\n" + (PROVOKE.format(action) if action else "true") + "\n")
        script.chmod(0o755)
    (tree / "kselftest-list.txt").write_text("lkdtm:warns.sh\nlkdtm:quiet.sh\n")
    result = pytester.runpytest_subprocess(*lkdtm_args, f"--umtt-kselftest={tree}", "-v")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        "*kselftest::lkdtm:warns.sh FAILED*",
        "*kselftest::lkdtm:quiet.sh PASSED*",
        "a kernel splat on kselftest: WARNING: lkdtm_WARNING:* (the test itself passed)",
        "kernel splats: 1 failed 1 test",
    ])


@pytest.mark.kernel
def test_a_flood_of_splats_is_shown_bounded(pytester: pytest.Pytester,
                                            kernel_args: list[str]) -> None:
    """3,000 headers that never end, in one run of the kernel: five shown whole, the rest
    counted by signature; the report stays small."""
    pytester.makepyfile("""
        def test_flood(umtt_machine):
            umtt_machine.run('for i in $(seq 3000); do '
                    'echo "WARNING: CPU: 0 PID: $i at x.c:1 f+0x1/0x2" > /dev/kmsg; done')
    """)
    result = pytester.runpytest_subprocess(*kernel_args)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "3000 kernel splats, first on uml: WARNING: WARNING: CPU: N PID: N at x.c:N f+N/N *",
        "WARNING on uml at * (its end was not seen)",
        "and 2995 more:",
        "  2995x on uml: WARNING: WARNING: CPU: N PID: N at x.c:N f+N/N",
        "kernel splats: 3000 failed 1 test",
    ])
    assert len(result.stdout.str()) < 20_000
