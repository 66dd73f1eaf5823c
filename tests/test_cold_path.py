"""A new machine's first run: the kernel source fetched and unpacked, and every way that
can fail part-way (Ctrl-C, a full disk, no apt-get, an unreachable package archive, a
hostile tarball) leaving nothing a later run takes for complete, and saying what to do.

Each failure is made to happen on demand: fake ``apt-get``/``dpkg-deb``/``dpkg-query``
on PATH, small tarballs built here, a member check that is interrupted. The real cold
path (Debian's source, the kernel, the root, kselftests, from an empty cache) runs in
.ci/run.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_umtt import kernel, rootfs
from pytest_umtt.cache import run_step
from pytest_umtt.errors import KernelError, RootfsError

TOP = "linux-9.9"


def make_tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A .tar.xz of exactly these members (in this order)."""
    with tarfile.open(path, "w:xz") as archive:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def entry(name: str, kind: bytes = tarfile.REGTYPE, *, link: str = "",
          mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    return info


def good_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        (entry(TOP, tarfile.DIRTYPE, mode=0o755), b""),
        (entry(f"{TOP}/Makefile"), b"all:\n"),
        (entry(f"{TOP}/scripts", tarfile.DIRTYPE, mode=0o755), b""),
        (entry(f"{TOP}/scripts/run.sh", mode=0o755), b"#!/bin/sh\n"),
        (entry(f"{TOP}/scripts/again.sh", tarfile.LNKTYPE, link=f"{TOP}/scripts/run.sh",
               mode=0o755), b""),
        (entry(f"{TOP}/tools", tarfile.DIRTYPE, mode=0o755), b""),
        (entry(f"{TOP}/tools/run", tarfile.SYMTYPE, link="../scripts/run.sh"), b""),
    ]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


# --- a safe extraction -----------------------------------------------------------------

def test_a_source_tarball_is_unpacked_whole(tmp_path: Path) -> None:
    target = tmp_path / "src" / "linux"
    kernel.extract_tree(make_tarball(tmp_path / "good.tar.xz", good_members()), target)
    assert (target / "Makefile").read_text() == "all:\n"
    assert os.stat(target / "scripts" / "run.sh").st_mode & stat.S_IXUSR
    assert (target / "scripts" / "again.sh").samefile(target / "scripts" / "run.sh")
    assert os.readlink(target / "tools" / "run") == "../scripts/run.sh"
    assert leftovers(target.parent) == ["linux"]


ESCAPES = {
    "absolute path": (entry("/tmp/umtt-escape"), "is absolute"),
    "dot-dot": (entry(f"{TOP}/../../escape"), "leaves the tree"),
    "symlink out": (entry(f"{TOP}/out", tarfile.SYMTYPE, link="../../etc"), "leaves the tree"),
    "absolute symlink": (entry(f"{TOP}/etc", tarfile.SYMTYPE, link="/etc"), "is absolute"),
    "hard link out": (entry(f"{TOP}/passwd", tarfile.LNKTYPE, link="../etc/passwd"),
                      "leaves the tree"),
    "device": (entry(f"{TOP}/sda", tarfile.BLKTYPE), "special file"),
    "fifo": (entry(f"{TOP}/pipe", tarfile.FIFOTYPE), "special file"),
}


@pytest.mark.parametrize("kind", list(ESCAPES))
def test_a_member_that_could_escape_is_refused_by_name(tmp_path: Path, kind: str) -> None:
    bad, why = ESCAPES[kind]
    tarball = make_tarball(tmp_path / "bad.tar.xz", [*good_members()[:2], (bad, b"x")])
    target = tmp_path / "src" / "linux"
    with pytest.raises(KernelError, match=f"refusing member '{bad.name}': .*{why}"):
        kernel.extract_tree(tarball, target)
    assert leftovers(target.parent) == []
    assert not Path("/tmp/umtt-escape").exists()


def test_a_tarball_that_is_not_one_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(b"not a tarball at all")
    with pytest.raises(KernelError, match=f"{junk} is not a readable tar archive"):
        kernel.extract_tree(junk, tmp_path / "src" / "linux")
    assert leftovers(tmp_path / "src") == []


# --- interrupted and failed steps ------------------------------------------------------

def interrupt_at(monkeypatch: pytest.MonkeyPatch, count: int, error: BaseException) -> None:
    """The ``count``-th member written raises ``error`` (Ctrl-C, a full disk) instead."""
    real: Callable[..., None] = kernel._extract_checked
    written = 0

    def extract(archive: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
        nonlocal written
        written += 1
        if written == count:
            raise error
        real(archive, member, into)

    monkeypatch.setattr(kernel, "_extract_checked", extract)


@pytest.fixture
def installed_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache for debian_source whose installed package is a small tarball of ours."""
    tarball = make_tarball(tmp_path / "linux-source.tar.xz", good_members())
    monkeypatch.setattr(kernel, "_debian_tarball", lambda cache, say: (tarball, "9.9-1"))
    return tmp_path / "cache"


def test_ctrl_c_during_extraction_keeps_nothing_and_the_next_run_completes(
        installed_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_at(monkeypatch, 4, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        kernel.debian_source(installed_source, lambda _: None)
    assert [n for n in leftovers(installed_source / "src") if not n.endswith(".lock")] == []
    monkeypatch.undo()
    monkeypatch.setattr(kernel, "_debian_tarball",
                        lambda cache, say: (installed_source.parent / "linux-source.tar.xz",
                                            "9.9-1"))
    source = kernel.debian_source(installed_source, lambda _: None)
    assert (source.path / "tools" / "run").is_symlink()


def test_a_full_disk_during_extraction_says_what_to_do(
        installed_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_at(monkeypatch, 3, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(KernelError, match=r"No space left on device; nothing was kept.*"
                                          "run umtt-kernel build again"):
        kernel.debian_source(installed_source, lambda _: None)
    assert [n for n in leftovers(installed_source / "src") if not n.endswith(".lock")] == []


def fake_tools(directory: Path, scripts: dict[str, str]) -> Path:
    """Executables named after the tools they stand in for, on a PATH of their own."""
    directory.mkdir(exist_ok=True)
    for name, body in scripts.items():
        tool = directory / name
        tool.write_text(f"#!/bin/sh\nPATH=/usr/bin:/bin\n{body}\n")
        tool.chmod(0o755)
    return directory


NOT_INSTALLED = "exit 1"


def test_no_source_package_and_no_apt_get(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", {"dpkg-query": NOT_INSTALLED})))
    with pytest.raises(KernelError, match="not installed and there is no apt-get; pass "
                                          "--source DIR"):
        kernel.debian_source(tmp_path / "cache", lambda _: None)


def test_an_unreachable_package_archive_is_named(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    failing = ("echo \"E: Failed to fetch http://deb.debian.org/debian/pool/main/l/linux/x.deb"
               "  Temporary failure resolving 'deb.debian.org'\" >&2; exit 100")
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", {
        "dpkg-query": NOT_INSTALLED, "apt-get": failing})))
    with pytest.raises(KernelError, match="Temporary failure resolving 'deb.debian.org'. "
                                          r"Check that the package archive is reachable \(sudo "
                                          r"apt-get update\).*run umtt-kernel build again"):
        kernel.debian_source(tmp_path / "cache", lambda _: None)
    assert leftovers(tmp_path / "cache" / "downloads") == []


def downloaded_package(tmp_path: Path, unpack: str) -> dict[str, str]:
    """apt-get download gives a .deb; dpkg-deb -x does ``unpack``."""
    tarball = make_tarball(tmp_path / "inside.tar.xz", good_members())
    inside = kernel.DEBIAN_SOURCE_TARBALL.relative_to("/")
    return {
        "dpkg-query": NOT_INSTALLED,
        "apt-get": f"touch {kernel.DEBIAN_SOURCE_PACKAGE}_9.9-1_all.deb",
        "dpkg-deb": f"""case "$1" in
  -f) echo 9.9-1 ;;
  -x) mkdir -p "$3/{inside.parent}"; {unpack.format(tarball=tarball, out=f'"$3/{inside}"')} ;;
esac""",
    }


def test_a_package_unpack_that_fails_part_way_is_not_taken_for_complete(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    half = "head -c 100 {tarball} > {out}; echo 'dpkg-deb: error: No space left' >&2; exit 2"
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", downloaded_package(
        tmp_path, half))))
    with pytest.raises(KernelError, match=r"dpkg-deb -x .* failed: dpkg-deb: error: No space"):
        kernel.debian_source(cache, lambda _: None)
    assert [n for n in leftovers(cache / "downloads") if not n.endswith(".deb")] == []
    fake_tools(tmp_path / "bin", downloaded_package(tmp_path, "cp {tarball} {out}"))
    source = kernel.debian_source(cache, lambda _: None)
    assert source.version == "9.9-1" and (source.path / "Makefile").is_file()


def test_the_root_filesystem_names_an_unreachable_archive(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UMTT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(fake_tools(tmp_path / "bin", {
        "apt-get": "echo 'E: Failed to fetch http://deb.debian.org/x.deb' >&2; exit 100"})))
    monkeypatch.setattr(rootfs, "candidate_versions", lambda names: dict.fromkeys(names, "1"))
    with pytest.raises(RootfsError, match=r"Failed to fetch .* run umtt-rootfs build again"):
        rootfs.build_rootfs(["bash"])
    assert [n for n in leftovers(tmp_path / "cache" / "rootfs") if not n.endswith(".lock")] == []


# --- the command-line tools -------------------------------------------------------------

@pytest.mark.parametrize(("failure", "code", "said"), [
    (KernelError("no kernel source"), 1, "no kernel source"),
    (OSError(errno.ENOSPC, "No space left on device"), 1,
     "build failed: [Errno 28] No space left on device; nothing half-built was kept. Free "
     "space in"),
    (KeyboardInterrupt(), 130, "interrupted; nothing half-built was kept (run umtt-kernel "
                               "build again to go on)"),
])
def test_a_failed_step_says_what_to_run_next(failure: BaseException, code: int,
                                             said: str) -> None:
    lines: list[str] = []

    def step() -> int:
        raise failure

    assert run_step("umtt-kernel", "build", step, lines.append) == code
    assert len(lines) == 1 and said in lines[0]


def test_bootstrap_without_apt_get_says_so(tmp_path: Path) -> None:
    bootstrap = Path(__file__).resolve().parent.parent / "bootstrap"
    bin_dir = fake_tools(tmp_path / "bin", {"dpkg-query": NOT_INSTALLED})
    for tool in ("bash", "dirname", "id", "grep", "cat"):
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    done = subprocess.run([str(bootstrap)], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode != 0
    assert "no apt-get" in done.stderr and "Debian" in done.stderr, done.stderr
