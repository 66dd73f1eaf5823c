"""Triage without kernels: failure rates and their intervals, failure signatures, delta
debugging, and the perturbed decisions a run records and can revert one by one."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import re
import threading
from pathlib import Path
from xml.etree import ElementTree

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_umtt import Simulation
from pytest_umtt.controller import Calendar, Clock, Decisions, StopReason
from pytest_umtt.controller.perturb import Decision, Perturbation
from pytest_umtt.errors import MachineCrashed
from pytest_umtt.rootfs import Rootfs
from pytest_umtt.triage import (
    Z_95,
    call_trace_frames,
    ddmin,
    failure_signature,
    format_rate,
    mask,
    wilson_interval,
)
from pytest_umtt.wire import Op
from tests.conftest import Connect
from tests.test_scenarios import boot_together

# --- the failure rate's interval --------------------------------------------------------


@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_bounds_are_where_the_score_test_is_exactly_at_95(case: tuple[int, int]) -> None:
    """The Wilson interval is the set of rates p with |k/n - p| <= z sqrt(p(1-p)/n):
    an inner bound is a root of the equality, an end (0 or 1) is one only when k is."""
    failures, runs = case
    low, high = wilson_interval(failures, runs)
    observed = failures / runs
    assert 0.0 <= low <= observed <= high <= 1.0
    for bound, end in ((low, 0.0), (high, 1.0)):
        if bound == end:
            assert failures == (0 if end == 0.0 else runs)
            continue
        gap = (observed - bound) ** 2 - Z_95 ** 2 * bound * (1 - bound) / runs
        assert math.isclose(gap, 0.0, abs_tol=1e-12), (case, bound)


def test_wilson_interval_in_numbers() -> None:
    assert wilson_interval(0, 20)[1] == pytest.approx(0.1611, abs=1e-4)  # 0 of 20: up to 16%
    assert wilson_interval(6, 20) == pytest.approx((0.1455, 0.5190), abs=1e-4)
    low, high = wilson_interval(14, 20)
    assert (low, high) == pytest.approx((1 - 0.5190, 1 - 0.1455), abs=1e-4)  # symmetric
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert format_rate(6, 20) == "30.0% (95% CI 14.5%-51.9%)"
    with pytest.raises(ValueError, match=r"within 0\.\.runs"):
        wilson_interval(3, 2)


# --- signatures ----------------------------------------------------------------------------


def test_mask_hides_what_differs_between_runs_of_one_failure() -> None:
    assert mask("odd byte 137 at 0x7fff1234 after 1.500000000 s in /tmp/umtt-x1/a.log") == \
        "odd byte <N> at <hex> after <time> in <path>"
    assert mask("took 12 ms, 3.5s, 250ns at 2026-12-07T03:04:05") == \
        "took <time>, <time>, <time> at <time>"
    assert mask("address 0000000060031234 digest 9f86d081884c7d65") == \
        "address <hex> digest <hex>"
    assert mask("eth0 on test_x2 saw -4 and 1e-3") == "eth0 on test_x2 saw <N> and <N>"


def test_signatures_group_equal_failures_and_part_others() -> None:
    one = failure_signature(AssertionError("odd byte 137\nassert 137 % 2 == 0"))
    assert one == "AssertionError: odd byte <N>"
    assert failure_signature(AssertionError("odd byte 9")) == one
    assert failure_signature(ValueError("odd byte 9")) != one
    assert failure_signature(AssertionError("even byte 9")) != one
    assert failure_signature(RuntimeError()) == "RuntimeError"
    long = failure_signature(AssertionError("x" * 1000))
    assert len(long) < 300 and long.endswith("...")


UML_OOPS = """\
[2.000100000 s] BUG: kernel NULL pointer dereference, address: 0000000000000000
[2.000100000 s] Modules linked in:
[2.000100000 s] Pid: 47, comm: bash Not tainted 6.12.0 #1
[2.000100000 s] RIP: 0033:lkdtm_do_action+0x1a/0x30
[2.000100000 s] Stack:
[2.000100000 s]  6081b9c0 60a3c3f0 a1e7fd48 6003a9e1
[2.000100000 s] Call Trace:
[2.000100000 s]  [<60020f27>] ? show_stack+0x13b/0x158
[2.000100000 s]  [<6047e4d5>] lkdtm_do_action+0x1a/0x30
[2.000100000 s]  [<6047e6b9>] direct_entry+0x112/0x150
[2.000100000 s]  [<6017a2fc>] ? kfree+0x2c/0x40
[2.000100000 s]  [<601f7f53>] full_proxy_write+0x53/0x80
[2.000100000 s]  [<60122b95>] vfs_write+0xd5/0x420
[2.000100000 s]  [<60122e7d>] ksys_write+0x6d/0xf0
[2.000100000 s] ---[ end trace 0000000000000000 ]---
"""


def test_a_crash_signature_is_its_kind_and_first_frames() -> None:
    assert call_trace_frames(UML_OOPS) == [
        "lkdtm_do_action", "direct_entry", "full_proxy_write", "vfs_write"]
    assert call_trace_frames(UML_OOPS, count=2) == ["lkdtm_do_action", "direct_entry"]
    assert call_trace_frames("no trace here\n") == []
    crash = MachineCrashed("a", "kernel BUG: BUG: kernel NULL pointer dereference, address: "
                           "0000000000000000 (seen at 2.000100000 s)", 2_000_100_000, UML_OOPS)
    assert failure_signature(crash) == (
        "MachineCrashed: kernel BUG: BUG: kernel NULL pointer dereference, address: <hex> | "
        "lkdtm_do_action < direct_entry < full_proxy_write < vfs_write")
    elsewhere = MachineCrashed("b", crash.what.replace("2.0001", "7.5"), 7_500_000_000,
                               UML_OOPS.replace("[2.000100000 s]", "[7.5 s]")
                               .replace("6047e4d5", "6047e4d6"))
    assert failure_signature(elsewhere) == failure_signature(crash)
    other_path = UML_OOPS.replace("direct_entry", "debugfs_write")
    assert failure_signature(MachineCrashed("a", crash.what, 0, other_path)) != \
        failure_signature(crash)


# --- delta debugging -----------------------------------------------------------------------


def test_ddmin_finds_the_one_and_the_two_that_matter() -> None:
    calls: list[frozenset[int]] = []

    def needs(*culprits: int) -> functools.partial[bool]:
        def fails(subset: list[int]) -> bool:
            calls.append(frozenset(subset))
            return set(culprits) <= set(subset)
        return functools.partial(fails)

    one = ddmin(list(range(64)), needs(41))
    assert one.minimal == [41] and one.complete
    assert one.runs <= 2 * 6 + 2, one.runs  # about two reruns per halving
    assert len(calls) == len(set(calls)) == one.runs  # no subset is run twice
    two = ddmin(list(range(64)), needs(3, 60))
    assert two.minimal == [3, 60] and two.complete


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.frozensets(st.integers(0, n - 1), min_size=1, max_size=3),
                         min_size=1, max_size=3))))
def test_ddmin_result_fails_and_no_single_decision_can_go(case: tuple[int, list[frozenset[int]]]
                                                          ) -> None:
    """Against a predicate made of several alternative causes (fails when any one set of
    decisions is all kept): the result fails, and is 1-minimal."""
    size, causes = case

    def fails(subset: list[int]) -> bool:
        return any(cause <= set(subset) for cause in causes)

    result = ddmin(list(range(size)), fails)
    assert result.complete and fails(result.minimal)
    assert result.minimal == sorted(result.minimal)
    for index in range(len(result.minimal)):
        assert not fails(result.minimal[:index] + result.minimal[index + 1:])


def test_ddmin_stops_at_its_budget_with_the_smallest_failing_so_far() -> None:
    result = ddmin(list(range(64)), lambda subset: {5, 50} <= set(subset), budget=8)
    assert not result.complete and result.runs == 8
    assert {5, 50} <= set(result.minimal) and len(result.minimal) < 64


# --- recorded decisions, each revertible -----------------------------------------------------


def test_decisions_are_named_by_kind_participant_and_occurrence() -> None:
    decisions = Decisions(keep=["tie b>a #2", "drop a>b #1"])
    made = [decisions.decide("tie", "b>a", 10, "a"), decisions.decide("tie", "b>a", 20, "a"),
            decisions.decide("drop", "a>b", 30, 98), decisions.decide("tie", "c>a", 40, "a")]
    assert made == [False, True, True, False]
    assert [d.key for d in decisions.applied] == ["tie b>a #2", "drop a>b #1"]
    assert [d.key for d in decisions.reverted] == ["tie b>a #1", "tie c>a #1"]
    assert Decisions().decide("doorbell", "m", 0, 5)  # without keep: everything applies
    decision = decisions.applied[1]
    assert Decision.from_json(decision.to_json()) == decision
    assert "dropped a frame of 98 bytes" in decision.describe()


def clock_order(keep: list[str] | None, seed: int = 3) -> tuple[list[str], Decisions]:
    perturbation = Perturbation(seed, decisions=Decisions(keep))
    clock = Clock(ties=perturbation.ties, judge=perturbation.keeps_tie_order)
    order: list[str] = []
    for name in "abcdef":
        clock.call_at(100, functools.partial(order.append, name), name)
    clock.call_at(50, functools.partial(order.append, "early"), "early")
    clock.run_until(200)
    return order, perturbation.decisions


def test_tie_decisions_revert_to_first_in_first_out() -> None:
    seeded = Clock(ties=random.Random(3))
    plain: list[str] = []
    for name in "abcdef":
        seeded.call_at(100, functools.partial(plain.append, name), name)
    seeded.call_at(50, functools.partial(plain.append, "early"), "early")
    seeded.run_until(200)
    perturbed, decisions = clock_order(None)
    assert perturbed == plain != ["early", *"abcdef"]  # recording changes nothing
    assert decisions.applied and all(d.kind == "tie" for d in decisions.applied)
    keys = [d.key for d in decisions.applied]
    assert clock_order(keys)[0] == perturbed  # all kept: the perturbed run
    assert clock_order([])[0] == ["early", *"abcdef"]  # none kept: FIFO
    one, _ = clock_order(keys[:1])
    first = decisions.applied[0]
    assert one[1] == first.who.split(">")[0]  # the one kept decision still runs first
    assert one[2:] == sorted(one[2:])  # and everything after it is FIFO again


def doorbell_stop(connect: Connect, keep: list[str] | None) -> tuple[int, Decisions]:
    """A kernel-like client rings at 500 while running and yields at 700; when does the
    test see the doorbell, with the perturbed delay kept or reverted?"""
    decisions = Decisions(keep)
    with Calendar(tie_seed=4, doorbell_latency=1000, decisions=decisions) as calendar:
        _, ref = connect(calendar, "m")
        boot_together(calendar, (ref, 1, 500))

        def guest() -> None:
            while ref.recv().op != Op.RUN:
                pass
            ref.broadcast(7)
            ref.request(700)
            ref.send(Op.WAIT, 2**64 - 1)
            with contextlib.suppress(EOFError):  # unperturbed, the test stops at 700
                while ref.recv().op != Op.RUN:
                    pass
                ref.request(10**6)
                ref.send(Op.WAIT, 2**64 - 1)

        thread = threading.Thread(target=guest)
        thread.start()
        stop = calendar.run_until(deadline_ns=10**5)
    thread.join(timeout=5)
    assert stop.reason is StopReason.DOORBELL and stop.value == 7
    return stop.time, decisions


def test_a_reverted_doorbell_delay_pauses_as_an_unperturbed_run(connect: Connect) -> None:
    delayed, decisions = doorbell_stop(connect, None)
    assert [d.key for d in decisions.applied] == ["doorbell m #1"]
    delay = decisions.applied[0].value
    assert isinstance(delay, int) and delayed == 700 + delay
    assert doorbell_stop(connect, ["doorbell m #1"])[0] == delayed
    reverted, again = doorbell_stop(connect, [])
    assert reverted == 500 and [d.key for d in again.reverted] == ["doorbell m #1"]


# --- on real kernels ---------------------------------------------------------------------------

PAIR_TEST = """
    SERVER = ("import socket\\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\\n"
              "s.bind(('10.0.0.2', 5000)); s.settimeout(1); got = []\\n"
              "try:\\n"
              "    while len(got) < 3: got.append(s.recv(64).decode())\\n"
              "except OSError: pass\\n"
              "print(*got)\\n")
    CLIENT = ("import socket\\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\\n"
              "for n in range(3): s.sendto(str(n).encode(), ('10.0.0.2', 5000))\\n")

    def test_pair(umtt_machine_factory, umtt_sim, umtt_network):
        umtt_network.link("a", "b", latency=0.001, bandwidth_bps=10**8, reorder=0.3,
                          reorder_delay=0.003, loss=0.1)
        a = umtt_machine_factory("a", devices=[umtt_network.port("a")], boot=False)
        b = umtt_machine_factory("b", devices=[umtt_network.port("b")], boot=False)
        umtt_sim.boot(a, b)
        a.run("ip addr add 10.0.0.1/24 dev eth0 && ip link set eth0 up", check=True)
        b.run("ip addr add 10.0.0.2/24 dev eth0 && ip link set eth0 up", check=True)
        listening = b.start(f'python3 -c "{SERVER}"')
        a.run(f'sleep 0.2; python3 -c "{CLIENT}"', check=True)
        got = listening.wait().output.split()
        assert len(got) == 3, f"lost: got {len(got)} of 3 updates by {umtt_sim.now} s"
        assert got == sorted(got), f"out of order: {got}"
"""


def explore_line(result: pytest.RunResult) -> tuple[str, list[str], list[int]]:
    """The explore row of the one test, its signature rows, and its failing seeds."""
    index = next(i for i, line in enumerate(result.outlines) if line.startswith("explore:"))
    line = result.outlines[index]
    groups = [row for row in result.outlines[index + 1:] if row.startswith("  ")]
    seeds = [int(seed) for seed in line.split("(")[1].split(")")[0].split(", ")]
    return line, groups, seeds


@pytest.mark.kernel
def test_explore_reports_rate_interval_and_seeds_by_signature(
        pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile(PAIR_TEST)
    result = pytester.runpytest_subprocess(*kernel_args, "--umtt-explore=8",
                                           "--umtt-explore-json=explore.json",
                                           "--junitxml=report.xml")
    line, groups, failed = explore_line(result)
    assert 0 < len(failed) < 8, result.stdout.str()
    result.stdout.fnmatch_lines([  # each failure says how to find the decisions it needs
        "*umtt perturbed decisions*", "signature: AssertionError: *",
        "this run made * perturbed decision* (*); the fewest that fail it:",
        "  pytest test_explore_*.py::test_pair --umtt-seed=* --uml-kernel=* --umtt-shrink"])
    assert f"failure rate {format_rate(len(failed), 8)}" in line
    grouped = sorted(int(seed) for row in groups
                     for seed in row.split("(")[1].split(")")[0].split(", "))
    assert grouped == failed  # every failing seed in exactly one group
    assert all(": AssertionError: " in row and "<N>" in row for row in groups), groups
    summary = json.loads((pytester.path / "explore.json").read_text())
    (test,) = summary["tests"]
    assert (test["runs"], test["failures"]) == (8, len(failed))
    assert test["ci95"] == list(wilson_interval(len(failed), 8))
    assert sorted(s for group in test["groups"] for s in group["seeds"]) == failed
    assert sorted(failed + test["passed_seeds"]) == list(range(8))
    cases = ElementTree.parse(pytester.path / "report.xml").getroot().iter("testcase")
    properties = [{p.get("name"): p.get("value") for p in case.iter("property")}
                  for case in cases]
    assert all({"umtt_seed", "umtt_reproduce", "umtt_kernel", "umtt_root"} <= set(p)
               for p in properties)
    failing = [p for p in properties if "umtt_signature" in p]
    assert len(failing) == len(failed)
    assert all(f"--umtt-seed={p['umtt_seed']}" in str(p["umtt_reproduce"]) for p in failing)


@pytest.mark.kernel
def test_shrink_finds_the_decisions_a_failure_needs_and_the_schedule_replays_it(
        pytester: pytest.Pytester, kernel_args: list[str]) -> None:
    pytester.makepyfile(PAIR_TEST)
    _, _, failed = explore_line(pytester.runpytest_subprocess(*kernel_args, "--umtt-explore=8",
                                                              "--umtt-perturb"))
    artifacts = pytester.path / "artifacts"
    shrunk = pytester.runpytest_subprocess(*kernel_args, f"--umtt-seed={failed[0]}",
                                           "--umtt-perturb", "--umtt-shrink",
                                           f"--umtt-artifacts={artifacts}")
    shrunk.assert_outcomes(failed=1)
    line = next(line for line in shrunk.outlines if line.startswith("shrink:"))
    before, after = (int(n) for n in re.findall(r"(\d+) perturbed decisions? .*-> (\d+) perturbed",
                                                line)[0])
    assert "tie" in line.split("->")[0] and 1 <= after < before, line  # the ties all went
    (file,) = artifacts.glob("*/schedule.json")
    schedule = json.loads(file.read_text())
    assert (schedule["seed"], schedule["before"]) == (failed[0], before)
    assert len(schedule["decisions"]) == after
    assert {d["kind"] for d in schedule["decisions"]} <= {"drop", "reorder"}
    signature = schedule["signature"]
    replay = pytester.runpytest_subprocess(*kernel_args, f"--umtt-schedule={file}",
                                           "--junitxml=replay.xml")
    replay.assert_outcomes(failed=1)
    assert f'value="{signature}"' in (pytester.path / "replay.xml").read_text().replace(
        "&lt;", "<").replace("&gt;", ">")
    bundle = file.with_name("schedule.umtt-bundle")
    shrunk.stdout.fnmatch_lines([f"  replay bundle (kernel, root and schedule in one file): "
                                 f"pytest --umtt-replay={bundle}"])
    replayed = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--umtt-replay={bundle}",
                                             "--junitxml=bundle.xml")
    replayed.assert_outcomes(failed=1)
    replayed.stdout.fnmatch_lines([
        f"umtt: a shrunk schedule: the run keeps {after} perturbed decision* and reverts "
        "every other", "*- pytest-umtt replay -*", "reproduced: same run (fingerprint *"])
    assert f'value="{signature}"' in (pytester.path / "bundle.xml").read_text().replace(
        "&lt;", "<").replace("&gt;", ">")
    schedule["decisions"] = []  # every decision reverted: the failure goes away
    file.write_text(json.dumps(schedule))
    pytester.runpytest_subprocess(*kernel_args, f"--umtt-schedule={file}").assert_outcomes(
        passed=1)


def two_machine_run(uml_kernel: Path, rootfs: Rootfs, *, perturb: bool,
                    keep: list[str] | None) -> tuple[list[str], Decisions]:
    with Simulation(kernel=uml_kernel, rootfs=rootfs, seed=5, perturb=perturb,
                    decisions=Decisions(keep)) as sim:
        a = sim.machine("a", boot=False)
        b = sim.machine("b", boot=False)
        sim.boot(a, b)
        ring = "echo 12345 > /sys/kernel/um-ext-time/bc-message"  # a guest's doorbell
        jobs = [m.start(f"for i in 1 2 3; do sleep 0.01; echo $i > /dev/kmsg; {ring}; done")
                for m in (a, b)]
        for job in jobs:
            job.wait()
        a.run("true")
        return sim.fingerprint(), sim.decisions


@pytest.mark.kernel
def test_keeping_every_decision_is_the_perturbed_run_and_reverting_all_the_plain_one(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    perturbed, decisions = two_machine_run(uml_kernel, rootfs, perturb=True, keep=None)
    kinds = {d.kind for d in decisions.applied}
    assert kinds == {"tie", "doorbell"}, decisions.applied
    keys = [d.key for d in decisions.applied]
    assert two_machine_run(uml_kernel, rootfs, perturb=True, keep=keys)[0] == perturbed
    plain, none = two_machine_run(uml_kernel, rootfs, perturb=False, keep=None)
    assert not none.applied and plain != perturbed
    reverted, all_reverted = two_machine_run(uml_kernel, rootfs, perturb=True, keep=[])
    assert reverted == plain
    assert all_reverted.reverted and not all_reverted.applied


def test_a_schedule_that_is_not_one_is_a_usage_error_naming_the_file(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    (pytester.path / "bad.json").write_text('{"format": "something else"}')
    result = pytester.runpytest_subprocess("--umtt-schedule=bad.json", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--umtt-schedule=*bad.json: cannot read the schedule: "
                                 "ValueError: not a pytest-umtt schedule version 1 file*"])
    missing = pytester.runpytest_subprocess("--umtt-schedule=nowhere.json")
    missing.stderr.fnmatch_lines(["*--umtt-schedule: no file at 'nowhere.json'*"])
    other = {"format": "pytest-umtt schedule", "version": 1, "nodeid": "elsewhere.py::test_y",
             "seed": 3, "perturb": False, "decisions": []}
    (pytester.path / "other.json").write_text(json.dumps(other))
    elsewhere = pytester.runpytest_subprocess("--umtt-schedule=other.json",
                                              "-p", "no:cacheprovider")
    assert elsewhere.ret == pytest.ExitCode.USAGE_ERROR
    elsewhere.stderr.fnmatch_lines(["*replays elsewhere.py::test_y, which is not among the "
                                    "tests collected; run: pytest elsewhere.py::test_y "
                                    "--umtt-schedule=*other.json"])


def provoked_crash(uml_kernel: Path, rootfs: Rootfs, seed: int) -> MachineCrashed:
    with Simulation(kernel=uml_kernel, rootfs=rootfs, seed=seed) as sim:
        machine = sim.machine("m")
        with pytest.raises(MachineCrashed) as crashed:
            machine.run("mountpoint -q /sys/kernel/debug || "
                        "mount -t debugfs none /sys/kernel/debug; "
                        "echo EXCEPTION > /sys/kernel/debug/provoke-crash/DIRECT")
        return crashed.value


@pytest.mark.kernel
def test_a_real_oops_signature_names_its_kind_and_frames_whatever_the_seed(
        uml_kernel: Path, rootfs: Rootfs) -> None:
    signatures = {failure_signature(provoked_crash(uml_kernel, rootfs, seed))
                  for seed in (1, 2)}
    (signature,) = signatures  # one crash, one signature, wherever it lands
    kind, frames = signature.split(" | ")
    assert kind.startswith("MachineCrashed: kernel panic: ") and "<hex>" in kind
    assert frames.split(" < ")[:2] == ["direct_entry", "full_proxy_write"], signature
