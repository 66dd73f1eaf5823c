"""A failure travels: a failing test writes a replay bundle, and ``--umtt-replay`` runs it
again on an empty cache (no kernel, no root, no shim built) with the same fingerprint."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from pytest_umtt.bundle import STORE, RunRecord, write_bundle
from pytest_umtt.kernel import default_kernel
from pytest_umtt.rootfs import Rootfs

FLAKY = """
    def test_guest_entropy(umtt_machine, umtt_sim):
        first = umtt_machine.run("od -An -N8 -tx1 /dev/urandom; sleep 0.3; date +%s.%N").output
        umtt_sim.advance(1.5)
        second = umtt_machine.run("od -An -N4 -tu4 /dev/urandom").output
        assert first == second, "the guest drew other bytes"
"""


def _manifest(bundle: Path) -> dict[str, object]:
    with tarfile.open(bundle) as tar:
        stream = tar.extractfile("manifest.json")
        assert stream is not None
        return dict(json.loads(stream.read()))


@pytest.mark.kernel
def test_a_failing_test_replays_from_its_bundle_on_an_empty_cache(
        pytester: pytest.Pytester, kernel_args: list[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    test = pytester.makepyfile(test_entropy=FLAKY)
    artifacts = pytester.path / "artifacts"
    failed = pytester.runpytest_subprocess(*kernel_args, "--umtt-seed=3",
                                           f"--umtt-artifacts={artifacts}",
                                           "--junitxml=report.xml")
    failed.assert_outcomes(failed=1)
    bundles = sorted(artifacts.glob("*/*.umtt-bundle"))
    assert len(bundles) == 1, list(artifacts.rglob("*"))
    bundle = bundles[0]
    failed.stdout.fnmatch_lines(["*- umtt reproduce -*",
                                 "replay bundle (kernel, root, shim, seed, settings and test "
                                 "files in one file):",
                                 f"  pytest --umtt-replay={bundle}",
                                 "seed 3 (--umtt-seed); with the seed alone*",
                                 "  pytest test_entropy.py::test_guest_entropy --umtt-seed=3*"])
    assert f'name="umtt_bundle" value="{bundle}"' in (pytester.path / "report.xml").read_text()
    manifest = _manifest(bundle)
    fingerprint = manifest["fingerprint"]["sha256"]  # type: ignore[index]
    assert manifest["outcome"]["error"].startswith(  # type: ignore[index]
        "AssertionError: the guest drew other bytes")
    assert list((artifacts / STORE).glob("*.cpio.xz"))  # the root, shared

    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("UMTT_CACHE_DIR", str(empty))
    replayed = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--umtt-replay={bundle}")
    replayed.assert_outcomes(failed=1)
    replayed.stdout.fnmatch_lines([
        f"umtt: replaying {bundle}: test_entropy.py::test_guest_entropy, seed 3, written by "
        f"pytest-umtt 0.1.0*",
        "umtt: kernel */kernel/linux",
        "      from linux-source-6.12 *, built with pytest-umtt's patches: 0001-*",
        "umtt: seed 3 (from the bundle *), guest entropy seeded by the getrandom shim",
        "*- pytest-umtt replay -*",
        "outcome: failed in call: AssertionError: the guest drew other bytes*",
        f"reproduced: same run (fingerprint {fingerprint[:16]}, * items)",
    ])
    assert sorted(path.name for path in empty.iterdir()) == []  # nothing built or fetched

    # A test file that changed since: said, and here the run itself changes too.
    test.write_text(test.read_text().replace("advance(1.5)", "advance(2.5)"))
    changed = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--umtt-replay={bundle}")
    changed.stdout.fnmatch_lines([
        "umtt: WARNING: test_entropy.py changed since the bundle was written (sha256 *)",
        "*- pytest-umtt replay -*",
        "test_entropy.py changed since the bundle was written*",
        "first divergence at virtual time 1.* s on uml: *",
        "  in the bundle: [[]1.* s[]] uml *",
        "  in this replay: [[]*.* s[]] uml *",
        "  uml's console around it, in the bundle:",
        "*",
        "  uml's console around it, in this replay:",
        "*",
        "not reproduced: the run differed from the bundle's (fingerprint * here, "
        f"{fingerprint[:16]} in the bundle)",
    ])


def _fake_bundle(project: Path, scratch: Path,
                 schedule: list[dict[str, object]] | None = None) -> Path:
    """A bundle of ``test_x.py::test_x`` (which boots nothing) with a kernel of another
    source version and patches, and a root of other package versions."""
    kernel = scratch / "kernels" / "old" / "linux"
    kernel.parent.mkdir(parents=True)
    kernel.write_bytes(b"\x7fELF Linux version 6.12.117 (umtt@umtt) (gcc 12) #1 x")
    (kernel.parent / "source").write_text("linux-source-6.12 6.12.117-1\n")
    (kernel.parent / "patches").write_text("0001-um-zero-signal-registers\n")
    image = scratch / "rootfs.cpio"
    image.write_bytes(b"070701 image")
    test = project / "test_x.py"
    test.write_text("def test_x(): pass\n")
    record = RunRecord(
        nodeid="test_x.py::test_x", seed=1,
        settings={"mem": "256M", "cmdline": [], "virtual_timeout": 10.0, "wall_timeout": 30.0,
                  "perturb": False, "rootfs": "pinned"},
        markers={}, kernel=kernel, shim=None, test_files={"test_x.py": test},
        rootfs=Rootfs(image, hashlib.sha256(image.read_bytes()).hexdigest(),
                      ("bash=5.2.15-2+b7", "libc6=2.36-9+deb12u10")),
        fingerprint=["x"], outcome={"outcome": "failed", "when": "call"}, schedule=schedule)
    return write_bundle(record, project / "a" / "x.umtt-bundle", store=project / STORE)


def test_a_tampered_bundle_is_refused_naming_the_member(pytester: pytest.Pytester,
                                                         tmp_path: Path) -> None:
    bundle = _fake_bundle(pytester.path, tmp_path)
    stored = next((pytester.path / STORE).glob("*.xz"))
    stored.write_bytes(stored.read_bytes().replace(b"image", b"imagE"))
    result = pytester.runpytest_subprocess(f"--umtt-replay={bundle}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--umtt-replay: {stored} (the bundle's guest root) is "
                                 f"corrupt: *"])


def test_a_bundle_whose_schedule_is_not_one_is_refused_and_leaves_nothing(
        pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = _fake_bundle(pytester.path, tmp_path, schedule=[{"kind": "reorder"}])
    scratch = tmp_path / "tmpdir"  # where the bundle would be unpacked
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    result = pytester.runpytest_subprocess(f"--umtt-replay={bundle}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--umtt-replay: {bundle}: the manifest's schedule is not "
                                 f"a list of decisions (KeyError('key'))*"])
    assert [path.name for path in scratch.iterdir()] == []


def test_a_replay_names_how_this_machines_kernel_and_root_differ(
        pytester: pytest.Pytester, real_cache: Path, tmp_path: Path) -> None:
    if default_kernel() is None or not list((real_cache / "rootfs").glob("*/manifest.json")):
        pytest.skip("no kernel and root built in the cache to compare with")
    bundle = _fake_bundle(pytester.path, tmp_path)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--umtt-replay={bundle}")
    result.stdout.fnmatch_lines([
        "umtt: this machine's default kernel is another one (the bundle's is used): kernel "
        "sha256:* (bundle) / sha256:* (this machine); kernel source: linux-source-6.12 "
        "6.12.117-1 (bundle) / linux-source-6.12 6.12.* (this machine); pytest-umtt's kernel "
        "patches: 0001-um-zero-signal-registers (bundle) / 0001-um-zero-signal-registers "
        "0002-* (this machine); kernel banner: Linux version 6.12.117 *",
        "umtt: this machine's cached guest root is another one (the bundle's is used): guest "
        "root sha256:* (bundle) / sha256:* (this machine); packages that differ: bash "
        "5.2.15-2+b7 (bundle) / 5.2.* (this machine); *; and * more",
    ])
    result.assert_outcomes(passed=1)


MODULE = """
    def test_first_leaves_state(umtt_module_machine):
        umtt_module_machine.run("od -An -N4 -tu4 /dev/urandom > /tmp/drawn", check=True)

    def test_second_depends_on_it(umtt_module_machine):
        drawn = umtt_module_machine.run("cat /tmp/drawn", check=True).output.strip()
        assert drawn == "0", f"the first test drew {drawn}"
"""


@pytest.mark.kernel
def test_a_module_sharing_a_machine_is_bundled_and_replayed_as_a_whole(
        pytester: pytest.Pytester, kernel_args: list[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    pytester.makepyfile(test_shared=MODULE)
    artifacts = pytester.path / "artifacts"
    failed = pytester.runpytest_subprocess(*kernel_args, "--umtt-seed=4",
                                           f"--umtt-artifacts={artifacts}")
    failed.assert_outcomes(passed=1, failed=1)
    (bundle,) = artifacts.glob("test_shared.py/*.umtt-bundle")
    failed.stdout.fnmatch_lines([f"module bundle (its tests share one simulation; the replay "
                                 f"runs them all): pytest --umtt-replay={bundle}"])
    manifest = _manifest(bundle)
    assert manifest["nodeid"] == "test_shared.py"
    assert manifest["outcome"] == {
        "outcome": "failed", "when": "module",
        "error": "1 of 2 tests failed: test_shared.py::test_second_depends_on_it"}
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("UMTT_CACHE_DIR", str(empty))
    replayed = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--umtt-replay={bundle}")
    replayed.assert_outcomes(passed=1, failed=1)
    replayed.stdout.fnmatch_lines(["*- pytest-umtt replay -*",
                                   "outcome: failed in module: 1 of 2 tests failed: *",
                                   "reproduced: same run (fingerprint *"])
    assert list(empty.iterdir()) == []
