"""Replay bundles: written, read back, shared roots, tampering refused by name, and the
identity differences a replay or the canary reports. The round trip on a real kernel is
in tests/test_replay.py."""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_umtt.bundle import (
    KERNEL,
    MANIFEST,
    STORE,
    RunRecord,
    changed_test_files,
    fingerprint_digest,
    open_bundle,
    pack,
    store_name,
    write_bundle,
)
from pytest_umtt.bundle import main as bundle_main
from pytest_umtt.errors import BundleError
from pytest_umtt.identity import kernel_differences, package_differences, root_differences
from pytest_umtt.kernel import kernel_identity
from pytest_umtt.rootfs import Rootfs

PACKAGES = ("libc6=2.36-9+deb12u10", "bash=5.2.15-2+b7", "coreutils=9.1-1")


def _record(tmp_path: Path) -> RunRecord:
    built = tmp_path / "cache" / "kernels" / "k1"
    built.mkdir(parents=True)
    kernel = built / "linux"
    kernel.write_bytes(b"\x7fELF Linux version 6.12.118 (umtt@umtt) #1 " + bytes(range(256)) * 64)
    (built / "patches").write_text("0001-um-zero-signal-registers\n")
    (built / "source").write_text("linux-source-6.12 6.12.118-1~deb12u1\n")
    image = tmp_path / "cache" / "rootfs.cpio"
    image.write_bytes(b"070701" + b"root image " * 5000)
    shim = tmp_path / "cache" / "libumtt_getrandom.so"
    shim.write_bytes(b"\x7fELF shim")
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "conftest.py").write_text("# top\n")
    test = project / "tests" / "test_x.py"
    test.write_text("def test_x(umtt_machine): assert False\n")
    rootfs = Rootfs(image, hashlib.sha256(image.read_bytes()).hexdigest(), PACKAGES)
    return RunRecord(
        nodeid="tests/test_x.py::test_x", seed=7,
        settings={"mem": "256M", "cmdline": ["quiet"], "virtual_timeout": 86400.0,
                  "wall_timeout": 30.0, "perturb": True, "rootfs": "pinned"},
        markers={}, kernel=kernel, rootfs=rootfs, shim=shim,
        test_files={"tests/test_x.py": test, "conftest.py": project / "conftest.py"},
        fingerprint=["console uml hello", "result uml 'true' status=0"],
        outcome={"outcome": "failed", "when": "call", "error": "AssertionError: assert False"})


def _root(record: RunRecord) -> Rootfs:
    assert record.rootfs is not None
    return record.rootfs


def test_a_bundle_holds_the_run_and_shares_its_root(tmp_path: Path) -> None:
    record = _record(tmp_path)
    artifacts = tmp_path / "artifacts"
    first = write_bundle(record, artifacts / "a" / "a.umtt-bundle", store=artifacts / STORE)
    second = write_bundle(record, artifacts / "b" / "b.umtt-bundle", store=artifacts / STORE)
    assert first.read_bytes() == second.read_bytes()  # fixed metadata: same run, same file
    assert [p.name for p in (artifacts / STORE).glob("*.xz")] == [store_name(_root(record).digest)]
    with tarfile.open(first) as tar:
        names = tar.getnames()
    assert KERNEL in names and not any(name.startswith("root/") for name in names)

    bundle = open_bundle(second, tmp_path / "unpacked")
    assert bundle.kernel.read_bytes() == record.kernel.read_bytes()
    identity = kernel_identity(bundle.kernel)
    assert identity.patches == ("0001-um-zero-signal-registers",)
    assert identity.source == "linux-source-6.12 6.12.118-1~deb12u1"
    assert bundle.rootfs is not None and bundle.rootfs.packages == PACKAGES
    assert bundle.rootfs.image.read_bytes() == _root(record).image.read_bytes()
    assert bundle.shim is not None and bundle.shim.read_bytes() == b"\x7fELF shim"
    assert bundle.fingerprint == record.fingerprint
    assert bundle.fingerprint_sha256 == fingerprint_digest(record.fingerprint)
    assert (bundle.nodeid, bundle.seed, bundle.settings["cmdline"]) == (
        "tests/test_x.py::test_x", 7, ["quiet"])
    assert bundle.manifest["pytest_umtt"].startswith("0.1.0 (files sha256:")
    assert set(bundle.test_files) == {"tests/test_x.py", "conftest.py"}


def test_a_kernels_modules_travel_with_it_checked(tmp_path: Path) -> None:
    record = _record(tmp_path)
    modules = record.kernel.parent / "modules" / "6.12.118" / "kernel" / "drivers"
    modules.mkdir(parents=True)
    (modules / "gpio-mockup.ko").write_bytes(b"\x7fELF module")
    (modules.parent.parent / "modules.dep").write_text("kernel/drivers/gpio-mockup.ko:\n")
    (record.kernel.parent / "variant.json").write_text('{"variant": "kselftest:gpio"}\n')
    kernel_identity.__globals__["_identities"].clear()  # the files beside it changed
    original = kernel_identity(record.kernel)
    assert original.modules is not None
    target = write_bundle(record, tmp_path / "a.umtt-bundle", store=tmp_path / STORE)
    bundle = open_bundle(target, tmp_path / "unpacked")
    unpacked = kernel_identity(bundle.kernel)
    assert (unpacked.modules, unpacked.variant) == (original.modules, "kselftest:gpio")
    assert str(unpacked) == str(original)  # what the trace records: the same run

    def outside(data: bytes) -> bytes:
        tree = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(lzma.decompress(data))) as old, \
                tarfile.open(fileobj=tree, mode="w") as new:
            for info in old.getmembers():
                new.addfile(info, old.extractfile(info) if info.isfile() else None)
            link = tarfile.TarInfo("6.12.118/escape")
            link.type, link.linkname = tarfile.SYMTYPE, "../../../etc"
            new.addfile(link)
        return lzma.compress(tree.getvalue())

    _rewrite(target, "kernel/modules.tar.xz", outside)
    with pytest.raises(BundleError, match=r"member kernel/modules.tar.xz is corrupt"):
        open_bundle(target, tmp_path / "unpacked-again")
    # A manifest rewritten to match is still refused: the link would leave the tree.
    with tarfile.open(target) as tar:
        stored = tar.extractfile("kernel/modules.tar.xz").read()  # type: ignore[union-attr]
    tree = lzma.decompress(stored)
    entry = {"sha256": hashlib.sha256(tree).hexdigest(), "size": len(tree),
             "stored_sha256": hashlib.sha256(stored).hexdigest()}

    def forged(data: bytes) -> bytes:
        manifest = json.loads(data)
        manifest["members"]["kernel/modules.tar.xz"] = entry
        return json.dumps(manifest).encode()

    _rewrite(target, MANIFEST, forged)
    with pytest.raises(BundleError, match=r"member kernel/modules.tar.xz is not a modules "
                                          r"tree: .*refusing member '6.12.118/escape': "
                                          r"symlink to '../../../etc' leaves the tree"):
        open_bundle(target, tmp_path / "unpacked-forged")


def _rewrite(bundle: Path, member: str, change: Callable[[bytes], bytes]) -> None:
    """The bundle with one member's stored bytes changed."""
    with tarfile.open(bundle) as tar:
        members = [(info, tar.extractfile(info).read())  # type: ignore[union-attr]
                   for info in tar.getmembers()]
    with tarfile.open(bundle, "w") as tar:
        for info, stored in members:
            data = change(stored) if info.name == member else stored
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _flip_middle_byte(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x40]) + data[middle + 1:]


@pytest.mark.parametrize("member", ["kernel/linux.xz", "test-files/tests/test_x.py",
                                    "shim/umtt_getrandom.c", "run/fingerprint.txt.xz"])
@pytest.mark.parametrize("change", [_flip_middle_byte, lambda data: data + b"tampered"],
                         ids=["flipped", "appended"])
def test_a_corrupted_member_is_refused_by_name(tmp_path: Path, member: str,
                                               change: Callable[[bytes], bytes]) -> None:
    target = write_bundle(_record(tmp_path), tmp_path / "a.umtt-bundle",
                          store=tmp_path / STORE)
    _rewrite(target, member, change)
    with pytest.raises(BundleError, match=rf"a\.umtt-bundle: member {member} is corrupt"):
        open_bundle(target, tmp_path / "unpacked")


def test_a_corrupted_shared_root_is_refused_by_name(tmp_path: Path) -> None:
    record = _record(tmp_path)
    target = write_bundle(record, tmp_path / "a" / "a.umtt-bundle", store=tmp_path / STORE)
    stored = tmp_path / STORE / store_name(_root(record).digest)
    stored.write_bytes(stored.read_bytes()[:-40] + bytes(40))
    with pytest.raises(BundleError, match=rf"{stored.name} \(the bundle's guest root\) is "
                                          r"corrupt"):
        open_bundle(target, tmp_path / "unpacked")


def test_a_bundle_without_its_store_says_what_to_copy_and_pack_makes_one_file(
        tmp_path: Path) -> None:
    record = _record(tmp_path)
    target = write_bundle(record, tmp_path / "run" / "a" / "a.umtt-bundle",
                          store=tmp_path / "run" / STORE)
    alone = tmp_path / "alone.umtt-bundle"
    pack(target, alone)
    lonely = tmp_path / "elsewhere" / "a.umtt-bundle"
    lonely.parent.mkdir()
    lonely.write_bytes(target.read_bytes())
    with pytest.raises(BundleError, match=r"no umtt-store/\w+\.cpio\.xz beside it or above "
                                          r"it: copy .*umtt-bundle pack"):
        open_bundle(lonely, tmp_path / "unpacked")
    (tmp_path / "run" / STORE / store_name(_root(record).digest)).unlink()
    bundle = open_bundle(alone, tmp_path / "unpacked-alone")
    assert bundle.rootfs is not None
    assert bundle.rootfs.image.read_bytes() == _root(record).image.read_bytes()


def test_a_damaged_root_in_the_cache_is_not_bundled(tmp_path: Path) -> None:
    record = _record(tmp_path)
    root = _root(record)
    record.rootfs = Rootfs(root.image, "0" * 64, root.packages)
    with pytest.raises(BundleError, match=rf"the guest root {root.image} has sha256 \w+, but "
                                          r"its manifest says 0000000000000000: the cache is "
                                          r"damaged"):
        write_bundle(record, tmp_path / "a.umtt-bundle", store=tmp_path / STORE)
    assert not list((tmp_path / STORE).glob("*.xz*")) and not (tmp_path / "a.umtt-bundle").exists()


def test_what_is_not_a_bundle_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.umtt-bundle"
    bogus.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(BundleError, match="is not a replay bundle"):
        open_bundle(bogus, tmp_path / "x")
    target = write_bundle(_record(tmp_path), tmp_path / "a.umtt-bundle", store=tmp_path / STORE)
    _rewrite(target, MANIFEST, lambda data: data + b"}")
    with pytest.raises(BundleError, match=f"member {MANIFEST} is corrupt"):
        open_bundle(target, tmp_path / "y")


def test_a_changed_test_file_is_named(tmp_path: Path) -> None:
    record = _record(tmp_path)
    bundle = open_bundle(write_bundle(record, tmp_path / "a.umtt-bundle", store=tmp_path / STORE),
                         tmp_path / "unpacked")
    project = tmp_path / "project"
    assert changed_test_files(bundle, project) == []
    (project / "tests" / "test_x.py").write_text("def test_x(umtt_machine): assert True\n")
    (project / "conftest.py").unlink()
    changes = changed_test_files(bundle, project)
    assert changes[0].startswith("conftest.py: not here (the bundle holds it")
    assert changes[1].startswith("tests/test_x.py changed since the bundle was written")


# --- identity differences -----------------------------------------------------------------

def test_package_differences_name_each_package() -> None:
    found = ("libc6=2.36-9+deb12u10", "bash=5.2.15-2+b8", "util-linux=2.38.1-5")
    assert package_differences(PACKAGES, found) == [
        "bash 5.2.15-2+b7 (expected) / 5.2.15-2+b8 (here)",
        "coreutils 9.1-1 (expected) / missing (here)",
        "util-linux missing (expected) / 2.38.1-5 (here)"]
    expected = {"digest": "c997be5b631c6e43" + "0" * 48, "packages": list(PACKAGES)}
    (line,) = root_differences(expected, {"digest": "fb75d74c6bb0" + "1" * 52,
                                          "packages": list(found)})
    assert line.startswith("guest root sha256:c997be5b631c (expected) / sha256:fb75d74c6bb0 "
                           "(here); packages that differ: bash 5.2.15-2+b7")
    assert root_differences(expected, dict(expected)) == []
    unknown = root_differences({"digest": "ab" * 32}, expected)
    assert unknown[0].endswith("the expected root's package versions were not recorded")


def test_kernel_differences_name_source_patches_and_banner() -> None:
    old = {"sha256": "b8755d97f267" + "0" * 52, "source": "linux-source-6.12 6.12.117-1",
           "patches": ["0001-um-zero-signal-registers"],
           "banner": "Linux version 6.12.117 (umtt@umtt) (gcc 12.2.0) #1",
           "variant": "default", "modules": None}
    new = {"sha256": "21c516a36365" + "0" * 52,
           "source": "linux-source-6.12 6.12.118-1~deb12u1",
           "patches": ["0001-um-zero-signal-registers", "0002-um-irq-numbers-for-irq-domains"],
           "banner": "Linux version 6.12.118 (umtt@umtt) (gcc 12.2.0) #1",
           "variant": "default", "modules": None}
    lines = kernel_differences(old, new)
    assert lines[0] == "kernel sha256:b8755d97f267 (expected) / sha256:21c516a36365 (here)"
    assert lines[1] == ("kernel source: linux-source-6.12 6.12.117-1 (expected) / "
                        "linux-source-6.12 6.12.118-1~deb12u1 (here)")
    assert "0002-um-irq-numbers-for-irq-domains (here)" in lines[2]
    assert kernel_differences(old, dict(old)) == []
    rebuilt = dict(old, sha256="cd" * 32)
    assert kernel_differences(old, rebuilt)[-1] == ("same source, patches, banner, variant "
                                                    "and modules: another build")
    with_modules = dict(old, modules="ab" * 32, variant="kselftest:gpio")
    assert kernel_differences(old, with_modules)[1:] == [
        "kernel variant: default (expected) / kselftest:gpio (here)",
        "kernel modules sha256: none (expected) / abababababab (here)"]


def test_the_source_of_an_older_build_is_read_from_its_log(tmp_path: Path) -> None:
    kernel = tmp_path / "linux"
    kernel.write_bytes(b"Linux version 6.12.118 (umtt@umtt) #1 x")
    (tmp_path / "build.log").write_text(
        "$ make -C /c/src/linux-source-6.12_6.12.118-1~deb12u1+umtt-8aebcfde609a ARCH=um "
        "O=/c/build/b2 defconfig\n")
    assert kernel_identity(kernel).source == "linux-source-6.12 6.12.118-1~deb12u1"
    assert json.dumps(kernel_identity(kernel).provenance).count("6.12.118-1~deb12u1") == 1


def test_umtt_bundle_show_says_what_a_bundle_holds(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    record = _record(tmp_path)
    record.markers = {"umtt_seed": {"args": ["7"], "kwargs": {}}}
    target = write_bundle(record, tmp_path / "a.umtt-bundle", store=tmp_path / STORE)
    assert bundle_main(["show", str(target)]) == 0
    shown = capsys.readouterr().out.split("\n")
    assert shown[:3] == [
        "test     tests/test_x.py::test_x (seed 7)",
        "outcome  failed in call: AssertionError: assert False",
        "kernel   sha256:" + kernel_identity(record.kernel).sha256[:12] + " from linux-source-6.12 "
        "6.12.118-1~deb12u1, patches 0001-um-zero-signal-registers"]
    assert shown[3].startswith("root     sha256:") and "3 Debian packages, umtt-store/" in shown[3]
    assert 'markers  {"umtt_seed": {"args": ["7"], "kwargs": {}}}' in shown
    assert not any(line.startswith("schedule") for line in shown)
    record.schedule = [{"key": "reorder:a>b#2", "kind": "reorder", "time_ns": 5,
                        "who": "a>b", "value": 1}]
    shrunk = write_bundle(record, tmp_path / "b.umtt-bundle", store=tmp_path / STORE)
    assert bundle_main(["show", str(shrunk)]) == 0
    assert ("schedule 1 perturbed decision kept, every other reverted: reorder:a>b#2"
            in capsys.readouterr().out.split("\n"))
    assert bundle_main(["show", str(tmp_path / "none")]) == 1
    assert "is not a replay bundle" in capsys.readouterr().err
