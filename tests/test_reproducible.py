"""Same seed, same run on every host: the pinned kernel, the pinned root filesystem, a
fixed UML environment, times from the shared clock, and a golden run."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pytest_umtt import BootError, Simulation
from pytest_umtt import rootfs as rootfs_module
from pytest_umtt.canary import CanaryResult, golden_mismatch, host_variations, run_in_child
from pytest_umtt.errors import RootfsError
from pytest_umtt.kernel import KernelIdentity, check_kernel, kernel_identity
from pytest_umtt.rootfs import (
    Entry,
    Rootfs,
    build_image,
    cpio_paths,
    elf_needed,
    write_cpio,
)
from pytest_umtt.uml.console import Console

GOLDEN = Path(__file__).parent / "golden" / "canary.json"

# --- the pieces, without kernels ---------------------------------------------------------


def test_cpio_is_a_function_of_its_contents() -> None:
    tree = {"usr/bin/x": Entry(stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
            "usr": Entry(stat.S_IFDIR | 0o755), "usr/bin": Entry(stat.S_IFDIR | 0o755),
            "bin": Entry(stat.S_IFLNK | 0o777, b"usr/bin"),
            "dev/console": Entry(stat.S_IFCHR | 0o600, rdev=(5, 1))}
    image = write_cpio(tree)
    assert image == write_cpio(dict(reversed(tree.items())))
    assert [name for name, _ in cpio_paths(image)] == sorted(tree)
    assert dict(cpio_paths(image))["dev/console"] == stat.S_IFCHR | 0o600
    assert len(image) % 4 == 0


def test_elf_needed_reads_a_host_program() -> None:
    assert "libc.so.6" in elf_needed(Path("/usr/bin/true").read_bytes())
    assert elf_needed(b"#!/bin/sh\n") == []


def test_a_package_list_without_libc_is_refused(tmp_path: Path) -> None:
    deb = next(Path("/var/cache/apt/archives").glob("bash_*.deb"), None)
    if deb is None:
        subprocess.run(["apt-get", "download", "bash"], cwd=tmp_path, check=True,
                       capture_output=True)
        deb = next(tmp_path.glob("bash_*.deb"))
    with pytest.raises(RootfsError, match=r"libc\.so\.6 \(needed by usr/bin/bash"):
        build_image([deb])


def test_kernel_identity_tells_a_pinned_banner() -> None:
    pinned = KernelIdentity("Linux version 6.12.117 (umtt@umtt) (gcc 12) #1 "
                            "1970-01-01 00:00:00 UTC", "ab" * 32)
    counted = KernelIdentity("Linux version 6.12.117 (umtt@umtt) (gcc 12) #2 "
                             "1970-01-01 00:00:00 UTC", "ab" * 32)
    assert pinned.pinned and not counted.pinned
    assert "sha256:abababababab" in str(pinned)


def test_console_output_held_for_a_stamp_stays_first(tmp_path: Path) -> None:
    console = Console(tmp_path / "console.log")
    console.hold(b"printed first\n")
    console.feed(b"printed second\n", 5)
    console.close()
    assert [line.text for line in console.lines] == ["printed first", "printed second"]
    assert (tmp_path / "console.log").read_bytes() == b"printed first\nprinted second\n"


def test_a_golden_digest_for_another_kernel_and_root_says_what_differs() -> None:
    here = CanaryResult(
        "21c516a36365" + "0" * 52, "fb75d74c6bb0" + "0" * 52, 0, "d" * 64, 100,
        {"sha256": "21c516a36365" + "0" * 52, "source": "linux-source-6.12 6.12.118-1~deb12u1",
         "patches": ["0001-a", "0002-b"], "banner": "Linux version 6.12.118"},
        {"digest": "fb75d74c6bb0" + "0" * 52, "packages": ["bash=5.2.15-2+b13", "libc6=2.36-9"]})
    recorded: dict[str, dict[str, Any]] = {
        "b8755d97f267675d/c997be5b631c6e43": {"seed 0": "e" * 64},
        "1111111111111111/2222222222222222": {
            "seed 0": "f" * 64,
            "kernel": {"sha256": "1111111111111111" + "0" * 48, "patches": ["0001-a"],
                       "source": "linux-source-6.12 6.12.117-1",
                       "banner": "Linux version 6.12.117"},
            "root": {"digest": "2222222222222222" + "0" * 48,
                     "packages": ["bash=5.2.15-2+b7", "libc6=2.36-9"]}}}
    old, known = golden_mismatch(here, recorded).split("\n")[1:]
    assert old.startswith("against b8755d97f267675d/c997be5b631c6e43: kernel sha256:b8755d97f267 "
                          "(expected) / sha256:21c516a36365 (here); the golden kernel's source "
                          "and patches were not recorded")
    assert "the expected root's package versions were not recorded" in old
    assert ("kernel source: linux-source-6.12 6.12.117-1 (expected) / linux-source-6.12 "
            "6.12.118-1~deb12u1 (here)") in known
    assert "packages that differ: bash 5.2.15-2+b7 (expected) / 5.2.15-2+b13 (here)" in known


# --- real kernels ------------------------------------------------------------------------

@pytest.mark.kernel
def test_the_built_kernel_is_pinned(uml_kernel: Path) -> None:
    identity = kernel_identity(uml_kernel)
    assert identity.pinned, identity
    assert not [w for w in check_kernel(uml_kernel).warnings if "not pinned" in w]


@pytest.mark.kernel
def test_the_pinned_root_owns_inodes_and_directory_order(uml_kernel: Path,
                                                         rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine()
        listing = machine.run("ls -id / /usr/bin/bash; ls -f /; python3 -c 'print(6*7)'",
                              check=True).output.split("\n")
    # Inode numbers come from the guest's own ramfs, counted as the image unpacks.
    root_inode, bash_inode = (int(line.split()[0]) for line in listing[:2])
    entries = sum(1 for _ in cpio_paths(rootfs.image.read_bytes()))
    assert root_inode == 1 and bash_inode < entries, listing
    assert bash_inode != os.stat("/usr/bin/bash").st_ino
    assert "42" in listing
    host_order = [entry.name for entry in os.scandir("/")]
    assert listing[2:-2] != host_order


@pytest.mark.kernel
def test_a_128M_machine_boots_the_pinned_root(uml_kernel: Path, rootfs: Rootfs) -> None:
    assert rootfs.minimum_memory <= 128 * 2**20
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        machine = sim.machine(mem="128M")
        assert machine.run("python3 -c 'print(6*7)'", check=True).stdout == b"42\n"


@pytest.mark.kernel
def test_too_little_memory_for_the_root_is_refused_before_boot(uml_kernel: Path,
                                                               rootfs: Rootfs) -> None:
    too_small = f"{rootfs.minimum_memory // 2**20 - 8}M"
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        with pytest.raises(BootError, match=f"mem={too_small} is too small for the pinned root: "
                                            f"it needs at least "
                                            f"{rootfs.minimum_memory // 2**20}M"):
            sim.machine(mem=too_small)
        assert not sim.machines and not list(sim.directory.glob("*/linux*"))
        # The rule holds: what it asks for is enough.
        sim.machine(mem=f"{rootfs.minimum_memory // 2**20}M").run("true", check=True)


def test_a_root_without_its_compressed_image_is_not_taken_for_built(tmp_path: Path) -> None:
    (tmp_path / rootfs_module.MANIFEST_NAME).write_text('{"digest": "x", "packages": []}')
    (tmp_path / rootfs_module.IMAGE_NAME).write_bytes(b"cpio")
    assert rootfs_module.load_rootfs(tmp_path) is None


def test_without_lz4_the_root_says_what_to_install(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RootfsError, match=r"needs lz4 \(sudo apt-get install lz4\)"):
        rootfs_module.compress_image(tmp_path / "image", tmp_path / "image.lz4")


@pytest.mark.kernel
def test_times_come_from_the_shared_clock(uml_kernel: Path, rootfs: Rootfs) -> None:
    with Simulation(kernel=uml_kernel, rootfs=rootfs) as sim:
        first = sim.machine("first")
        set_clock = first.run("date -s @1600000000 >/dev/null")
        slept = first.run("sleep 1")
        assert slept.started_ns == set_clock.ended_ns
        assert slept.duration == pytest.approx(1.0, abs=1e-3)
        sim.advance(10)
        late = sim.machine("late")
        clocks = [m.run("date +%s.%N").output for m in (first, late)]
        late_sleep = late.run("sleep 2")
    assert late_sleep.started >= 10, late_sleep
    assert late_sleep.duration == pytest.approx(2.0, abs=1e-3)
    # The late machine's clock is the simulation's, not 10 s behind (first set its own).
    assert float(clocks[1]) - (1_700_000_000 + sim.now) < 3


@pytest.mark.kernel
def test_the_canary_matches_its_golden_digest(uml_kernel: Path) -> None:
    result = run_in_child(uml_kernel)
    recorded = json.loads(GOLDEN.read_text())["digests"]
    if result.key not in recorded:
        pytest.skip(golden_mismatch(result, recorded))
    assert result.digest == recorded[result.key]["seed 0"]


@pytest.mark.kernel
def test_host_variations_do_not_change_the_run(uml_kernel: Path, tmp_path: Path) -> None:
    digests = {name: run_in_child(v.kernel, v.prefix, v.env).digest
               for name, v in host_variations(uml_kernel, tmp_path).items()}
    assert len(digests) >= 7
    assert len(set(digests.values())) == 1, digests


def test_apt_is_asked_again_only_when_its_lists_change(monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("UMTT_CACHE_DIR", str(tmp_path / "cache"))
    lists = tmp_path / "lists"
    lists.mkdir()
    monkeypatch.setattr(rootfs_module, "APT_LISTS", lists)
    asked: list[list[str]] = []

    def ask(packages: list[str]) -> dict[str, str]:
        asked.append(list(packages))
        return {name: f"1.{len(asked)}" for name in packages}

    monkeypatch.setattr(rootfs_module, "_ask_apt", ask)
    assert rootfs_module.candidate_versions(["bash"]) == {"bash": "1.1"}
    assert rootfs_module.candidate_versions(["bash"]) == {"bash": "1.1"}
    assert len(asked) == 1
    (lists / "new_Packages").write_text("")  # apt-get update renames files into place
    assert rootfs_module.candidate_versions(["bash"]) == {"bash": "1.2"}
    assert rootfs_module.candidate_versions(["bash", "coreutils"])["coreutils"] == "1.3"
