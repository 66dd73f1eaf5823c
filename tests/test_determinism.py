"""Same seed, same run: checking it, exploring seeds, perturbing ties, reading traces."""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path

import pytest

from pytest_umtt.controller import Calendar, StopReason, Trace
from pytest_umtt.controller.perturb import Perturbation
from pytest_umtt.divergence import first_difference, first_divergence
from pytest_umtt.errors import format_ns
from pytest_umtt.summary import RunPairs, Variant, base_nodeid, pair_key
from pytest_umtt.tracetool import main as trace_main
from pytest_umtt.wire import Op
from tests.conftest import Connect
from tests.test_scenarios import boot_together

# --- the pieces, without kernels -------------------------------------------------------


def tie_order(tie_seed: int | None) -> list[str]:
    with Calendar(tie_seed=tie_seed) as calendar:
        order: list[str] = []
        for name in "abcdefgh":
            calendar.call_at(100, functools.partial(order.append, name))
        calendar.run_until()
        return order


def test_ties_are_fifo_unless_perturbed_and_then_seeded() -> None:
    assert tie_order(None) == list("abcdefgh")
    assert tie_order(1) == tie_order(1)
    assert {"".join(tie_order(seed)) for seed in range(6)} - {"abcdefgh"}


def doorbell_time(connect: Connect, tie_seed: int, queued: int = 0) -> int:
    with Calendar(tie_seed=tie_seed, doorbell_latency=1000) as calendar:
        for _ in range(queued):  # events that only draw tie orders
            calendar.call_at(50_000, lambda: None)
        _, ref = connect(calendar)
        boot_together(calendar, (ref, 1, 500))

        def guest() -> None:
            # Like a kernel: RUN at 500, ring, run on to 700 before the next time step,
            # yield there (its horizon was lowered), then sleep long.
            while ref.recv().op != Op.RUN:
                pass
            ref.broadcast(7)
            ref.request(700)
            ref.send(Op.WAIT, 2**64 - 1)
            while ref.recv().op != Op.RUN:
                pass
            ref.request(10**6)
            ref.send(Op.WAIT, 2**64 - 1)

        thread = threading.Thread(target=guest)
        thread.start()
        stop = calendar.run_until(deadline_ns=10**5)
        thread.join(timeout=5)
        assert stop.reason is StopReason.DOORBELL and stop.value == 7
        return stop.time


def test_perturbed_doorbells_pause_later_by_a_seeded_bounded_delay(connect: Connect) -> None:
    times = [doorbell_time(connect, seed) for seed in range(5)]
    # The delay counts from the instant the kernel yielded, not from its RUN.
    assert all(700 <= t <= 1700 for t in times), times
    assert len(set(times)) > 1
    assert doorbell_time(connect, 3) == times[3]


def test_the_tie_and_doorbell_streams_do_not_shift_each_other() -> None:
    quiet, busy = Perturbation(7, doorbell_latency=1000), Perturbation(7, doorbell_latency=1000)
    for _ in range(5):
        busy.doorbell_delay()
    assert [quiet.ties.getrandbits(32) for _ in range(8)] == \
        [busy.ties.getrandbits(32) for _ in range(8)]
    assert [quiet.doorbell_delay() for _ in range(5)] != [busy.doorbell_delay() for _ in range(5)]
    assert Perturbation(7).ties.random() == Perturbation(7).ties.random()
    assert Perturbation(7).doorbells.random() != Perturbation(8).doorbells.random()


def test_queued_events_do_not_move_a_perturbed_doorbell(connect: Connect) -> None:
    """Tie order and doorbell delay come from separate streams of one seed: drawing
    more tie orders leaves the doorbell where it was."""
    assert [doorbell_time(connect, seed, queued=5) for seed in range(3)] == \
        [doorbell_time(connect, seed) for seed in range(3)]


def test_first_difference_shows_both_sides() -> None:
    assert first_difference(["a", "b"], ["a", "b"]) is None
    text = first_difference(["a", "b", "c"], ["a", "x", "c"])
    assert text is not None and "item 1 of 3 / 3" in text
    assert "> 1: b" in text and "> 1: x" in text
    shorter = first_difference(["a", "b"], ["a"])
    assert shorter is not None and "(ends here)" in shorter


def _run(console: list[tuple[int, str]], status: int) -> list[str]:
    """A two-machine fingerprint as Simulation.fingerprint writes one."""
    protocol = [json.dumps({"client": client, "detail": "", "kind": kind, "now": now,
                            "op": op, "seq": 1, "time": now}, sort_keys=True)
                for now, client, kind, op in ((0, "a", "rx", "START"), (0, "b", "rx", "START"),
                                              (900, "b", "tx", "RUN"))]
    lines = [f"console a [{format_ns(t)}] {text}" for t, text in console]
    return [*protocol, *lines, f"result a 'cat /x' status={status} 0.000000500 s.."
            f"0.000000800 s stdout=0:e3b0c44298fc1c14 stderr=0:e3b0c44298fc1c14"]


def test_the_first_divergence_names_time_machine_kind_values_and_console() -> None:
    same = [(100, "boot 1"), (200, "boot 2"), (300, "ready"), (900, "late")]
    assert first_divergence(_run(same, 0), _run(same, 0)) is None
    other = [(100, "boot 1"), (200, "boot 2"), (300, "ready"), (700, "oops"), (900, "late")]
    divergence = first_divergence(_run(same, 0), _run(other, 1), labels=("run A", "run B"))
    assert divergence is not None
    assert str(divergence).split("\n") == [
        "first divergence at virtual time 0.000000500 s on a: command result (event 5 of the "
        "timeline)",
        "  run A: [0.000000500 s] a command result: 'cat /x' status=0 ended at 0.000000800 s "
        "stdout=0:e3b0c44298fc1c14 stderr=0:e3b0c44298fc1c14",
        "  run B: [0.000000500 s] a command result: 'cat /x' status=1 ended at 0.000000800 s "
        "stdout=0:e3b0c44298fc1c14 stderr=0:e3b0c44298fc1c14",
        "  a's console around it, run A:",
        "    [0.000000100 s] boot 1", "    [0.000000200 s] boot 2",
        "    [0.000000300 s] ready", "    [0.000000900 s] late",
        "  a's console around it, run B:",
        "    [0.000000100 s] boot 1", "    [0.000000200 s] boot 2", "    [0.000000300 s] ready",
        "    [0.000000700 s] oops", "    [0.000000900 s] late"]
    # A run that stops early diverges where it ended.
    shorter = first_divergence(["console a [0.000000100 s] x", "console a [0.000000200 s] y"],
                               ["console a [0.000000100 s] x"])
    assert shorter is not None and "  second run: (the run ended)" in str(shorter)
    assert str(shorter).startswith("first divergence at virtual time 0.000000200 s on a: "
                                   "console line")


def test_trace_diff_of_two_artifacts_directories_counts_console_lines(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name, lines in (("a", [(100, "x")]), ("b", [(100, "y")])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "fingerprint.txt").write_text("\n".join(_run(lines, 0)))
    assert trace_main(["diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert out.startswith("first divergence at virtual time 0.000000100 s on a: console line")
    assert "[0.000000100 s] a console line: y" in out


def traced_run(connect: Connect, path: Path, first: int) -> Path:
    trace = Trace()
    with Calendar(trace=trace) as calendar:
        _, ref = connect(calendar, "m1")
        boot_together(calendar, (ref, 1, first))
        with path.open("w") as stream:
            trace.write_jsonl(stream)
    return path


def test_trace_tool_show_diff_and_perfetto(connect: Connect, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    one = traced_run(connect, tmp_path / "one.jsonl", 500)
    two = traced_run(connect, tmp_path / "two.jsonl", 600)
    assert trace_main(["show", str(one)]) == 0
    assert "m1" in capsys.readouterr().out
    assert trace_main(["diff", str(one), str(one)]) == 0
    assert "identical" in capsys.readouterr().out
    assert trace_main(["diff", str(one), str(two)]) == 1
    diverged = capsys.readouterr().out.split("\n")
    assert diverged[:3] == [
        "first divergence at virtual time 0.000000500 s on m1: protocol run (event 6 of the "
        "timeline)", f"  {one}: [0.000000500 s] m1 protocol run",
        f"  {two}: [0.000000600 s] m1 protocol run"]
    out = tmp_path / "perfetto.json"
    assert trace_main(["perfetto", str(one), "-o", str(out)]) == 0
    slices = [e for e in json.loads(out.read_text())["traceEvents"] if e["ph"] == "X"]
    assert slices and all(e["name"] == "run" for e in slices)


def test_trace_tool_names_a_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"now": 0}\nnot json\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not a trace line"):
        trace_main(["show", str(bad)])


# --- on real kernels, through pytest -------------------------------------------------------

@pytest.mark.kernel
def test_check_determinism_passes_same_runs_and_shows_where_others_part(
        pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        RUNS = []

        def test_same(umtt_machine):
            umtt_machine.run("head -c 8 /dev/urandom | od -An -tx1; sleep 0.25")

        def test_host_dependent(umtt_machine):
            RUNS.append(1)  # host state the seed does not cover: the second run differs
            umtt_machine.run(f"sleep 0.{len(RUNS)}")
    """)
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-check-determinism")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines([
        "E * not deterministic: two runs with one seed differ; first divergence at virtual "
        "time 0.* s on uml: command result *",
        "E * first run: [[]0.* s[]] uml command result: 'sleep 0.1' status=0 ended at 0.1*",
        "E * second run: [[]0.* s[]] uml command result: 'sleep 0.2' status=0 ended at 0.2*",
        "E * uml's console around it, first run:",
        "*determinism: 2 tests run twice, 1 differed*",
        "*differs: test_check_determinism_passes_same_runs_and_shows_where_others_part.py"
        "::test_host_dependent*",
    ])


@pytest.mark.kernel
def test_explore_finds_failing_seeds_and_each_reproduces(pytester: pytest.Pytester,
                                                         kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        def test_coin(umtt_machine):
            byte = int(umtt_machine.run("od -An -N1 -tu1 /dev/urandom").output)
            assert byte % 2 == 0, f"odd byte {byte}"
    """)
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-explore=8")
    line = next(line for line in result.outlines if line.startswith("explore:"))
    failed = line.split("(")[1].split(")")[0].split(", ")
    assert 0 < len(failed) < 8, line
    assert f"--umtt-seed={failed[0]}" in line
    for seed in failed[:2]:
        rerun = pytester.runpytest_subprocess(*kernel_args, f"--umtt-seed={seed}")
        rerun.assert_outcomes(failed=1)


@pytest.mark.kernel
def test_summary_lines_are_the_same_with_xdist(pytester: pytest.Pytester,
                                                kernel_args: list[str]) -> None:
    pytester.makepyfile("""
        from pathlib import Path

        def test_same(umtt_machine):
            umtt_machine.run("head -c 8 /dev/urandom | od -An -tx1")

        def test_host_dependent(umtt_machine):
            runs = Path(__file__).with_name("runs")  # host state, whichever worker runs it
            runs.write_text(runs.read_text() + "x" if runs.exists() else "x")
            umtt_machine.run(f"sleep 0.{len(runs.read_text())}")
    """)
    args = (*kernel_args, "--umtt-check-determinism", "--umtt-explore=2")
    summaries = []
    for extra in ((), ("-n", "2")):
        (pytester.path / "runs").unlink(missing_ok=True)
        result = pytester.runpytest_subprocess(*args, *extra)
        summaries.append(sorted(line for line in result.outlines
                                if line.startswith(("determinism:", "explore:", "  differs:"))))
    assert summaries[0] == summaries[1], summaries
    assert "determinism: 4 tests run twice, 2 differed" in summaries[1]
    assert sum(line.startswith("explore:") for line in summaries[1]) == 2


def test_a_variant_suffix_is_read_back_in_one_place() -> None:
    for variant in (Variant(seed=3), Variant(run=2), Variant(seed=3, run=1)):
        nodeid = f"t.py::test_x[{variant.id}]"
        assert base_nodeid(nodeid) == "t.py::test_x"
    assert base_nodeid("t.py::test_x[a-seed=3-determinism-2]") == "t.py::test_x[a]"
    assert pair_key("t.py::test_x[seed=3-determinism-1]") == \
        pair_key("t.py::test_x[seed=3-determinism-2]") == "t.py::test_x[seed=3-determinism]"
    assert pair_key("t.py::test_x[seed=3-determinism-1]") != \
        pair_key("t.py::test_x[seed=4-determinism-1]")


def test_a_pair_is_judged_once_whether_its_fixture_or_its_report_comes_first() -> None:
    pairs = RunPairs()
    one, two = "t.py::test_x[determinism-1]", "t.py::test_x[determinism-2]"
    assert pairs.add(one, "d1", ["a", "b"]) is None  # the fixture, at teardown
    assert pairs.add(one, "d1") is None  # its report: the same run, nothing new
    assert pairs.add(two, "d2", ["a", "c"]) == (False, ["a", "b"])  # the second run
    assert pairs.add(two, "d2") is None  # its report: judged already
    assert pairs.judged == {"t.py::test_x[determinism]": False}
    assert pairs.differed == ["t.py::test_x"]
    named = RunPairs()  # a file whose name holds the word keeps it
    named.add("test_determinism.py::test_x[determinism-1]", "a")
    named.add("test_determinism.py::test_x[determinism-2]", "b")
    assert named.differed == ["test_determinism.py::test_x"]
    reports_only = RunPairs()  # an xdist controller: the two runs ended on two workers
    assert reports_only.add(one, "d") is None
    assert reports_only.add(two, "d") == (True, [])
    assert reports_only.differed == []
