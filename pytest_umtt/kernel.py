"""A time-travel UML kernel out of the box: config fragment, cached build, entropy shim.

Kernels land in ``<cache>/kernels/<KEY>/linux``; KEY hashes the source's identity and
the config fragment. Builds are serialised by a file lock, compiled in a per-source
object tree (so a changed fragment rebuilds incrementally) and published by renaming a
staging directory, so an interrupted build never leaves a kernel that looks usable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import TextIO

from filelock import FileLock

from .cache import cache_root, run_step, staging_beside, writable_dir
from .errors import KernelBuildError, KernelError
from .kconfig import (
    DEFAULT_CONFIG,
    KernelConfig,
    MergedConfig,
    did_not_take,
    fragment_options,
    fragment_text,
    merge,
)

# 2: KBUILD_BUILD_VERSION pinned (kernels built before carry a build counter).
# 3: the source carries pytest-umtt's patches (data/patches), named in the identity.
# 4: make runs in a fixed environment (build_environment): kernels built before took
#    their config from whatever rustc and pahole the user's PATH had.
RECIPE_VERSION = "4"
DEBIAN_SOURCE_PACKAGE = "linux-source-6.12"
DEBIAN_SOURCE_TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
BUILD_TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc",
               "patch": "patch"}
LIBELF_HEADER = Path("/usr/include/libelf.h")
APT_BUILD_PACKAGES = ("make", "gcc", "flex", "bison", "bc", "patch", "libelf-dev", "kmod")
REPRODUCIBLE_ENV = {
    # The guest's uname is part of the run: keep it the same on every machine.
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01 00:00:00 UTC",
    "KBUILD_BUILD_USER": "umtt",
    "KBUILD_BUILD_HOST": "umtt",
    # The "#N" in uname -v counts relinks of one object tree, and the kernel mixes its
    # uname into the entropy pool: without this, a rebuild changes every seeded run.
    "KBUILD_BUILD_VERSION": "1",
}
TIME_TRAVEL_MARKER = b"time-travel=ext:"
SCHEDSHM_MARKER = b"setting time while not running"
UML_MARKER = b"UML"
SHIM_NAME = "libumtt_getrandom.so"
PATCHES_FILE = "patches"
"""Beside a built kernel: the names of the patches its source carried, one per line."""
SOURCE_FILE = "source"
"""Beside a built kernel: one line naming its source (Debian package and version, or tree)."""
BUILD_LOG = "build.log"
LOG_TAIL_LINES = 25


# --- where things live ----------------------------------------------------------------

# --- sources --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KernelSource:
    """A Linux tree to build, with what identifies its contents for the cache key."""

    path: Path
    version: str
    identity: str
    default: bool = False
    patches: tuple[str, ...] = ()
    """The names of pytest-umtt's patches applied to this tree."""


def user_source(path: Path) -> KernelSource:
    """A tree the user gives: validated, identified by git state where there is one."""
    tree = path.resolve()
    if not (tree / "Makefile").is_file() or not (tree / "arch" / "um").is_dir():
        raise KernelError(f"{path} is not a Linux source tree (no Makefile or arch/um)")
    header = tree / "include" / "uapi" / "linux" / "um_timetravel.h"
    if not header.is_file():
        raise KernelError(f"{path}: this Linux has no time-travel=ext protocol "
                          f"(no include/uapi/linux/um_timetravel.h)")
    if b"um_timetravel_schedshm" not in header.read_bytes():
        raise KernelError(f"{path}: this Linux has time-travel=ext but not the shared-memory "
                          f"scheduler (schedshm, Linux 6.11 and later)")
    version = _make_kernelversion(tree)
    return KernelSource(tree, version, f"{tree}\n{version}\n{_git_identity(tree)}")


def _make_kernelversion(tree: Path) -> str:
    result = subprocess.run(["make", "-s", "-C", str(tree), "kernelversion"],
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def _git_identity(tree: Path) -> str:
    if not (tree / ".git").exists():
        return "no-git"
    head = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip()
    diff = subprocess.run(["git", "-C", str(tree), "diff", "HEAD"],
                          capture_output=True, check=False).stdout
    return f"{head} {hashlib.sha256(diff).hexdigest()[:16]}"


def debian_source(cache: Path, say: Callable[[str], None]) -> KernelSource:
    """Debian's linux-source-6.12, downloaded with apt if needed, extracted into the cache."""
    tarball, version = _debian_tarball(cache, say)
    target = cache / "src" / f"{DEBIAN_SOURCE_PACKAGE}_{version}"
    with FileLock(str(target) + ".lock"):
        if not (target / "Makefile").is_file():
            say(f"extracting {tarball.name} into {target.parent}")
            extract_tree(tarball, target)
    return KernelSource(target, version, f"debian {DEBIAN_SOURCE_PACKAGE} {version}", True)


def extract_tree(tarball: Path, target: Path) -> None:
    """Unpack a source tarball holding one top directory as ``target``, whole or not at
    all: it is unpacked beside ``target`` and renamed into place, so an interrupted or
    failed extraction leaves nothing a later run takes for complete."""
    with staging_beside(target) as staging:
        _extract_into(tarball, staging)
        tops = list(staging.iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            raise KernelError(f"{tarball}: expected one top directory, found "
                              f"{sorted(p.name for p in tops)[:5]}")
        shutil.rmtree(target, ignore_errors=True)
        tops[0].rename(target)


def _extract_into(tarball: Path, staging: Path) -> None:
    """Unpack ``tarball`` into ``staging``, one pass over the stream, each member checked
    before it is written (Python before 3.11.4, Debian 12's 3.11.2 among them, has no
    ``extractall(filter=)``); a disk that fills up is named with what to do about it."""
    try:
        with tarfile.open(tarball, mode="r|*") as archive:
            extract_members(archive, staging, tarball)
    except OSError as exc:
        raise KernelError(f"extracting {tarball} into {staging.parent} failed: "
                          f"{exc.strerror or exc}; nothing was kept. Free space there (the "
                          f"source takes ~1.5 GB) or set UMTT_CACHE_DIR, then run "
                          f"umtt-kernel build again") from None
    except tarfile.TarError as exc:
        raise KernelError(f"{tarball} is not a readable tar archive ({exc}); reinstall "
                          f"{DEBIAN_SOURCE_PACKAGE} and run umtt-kernel build again") from None


def extract_members(archive: tarfile.TarFile, into: Path, where: Path) -> None:
    """Write every member of ``archive`` under ``into``, each checked first
    (:func:`check_tar_member`; ``where`` names the archive in the error)."""
    for member in archive:
        check_tar_member(member, where)
        _extract_checked(archive, member, into)


def _extract_checked(archive: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    """Write a member check_tar_member let through. Pythons with tarfile filters (3.11.4
    and later) are told it was checked, so they neither warn nor apply a default of
    their own; directories get their modes as created (set_attrs off, as extractall)."""
    if hasattr(tarfile, "fully_trusted_filter"):
        archive.extract(member, into, set_attrs=not member.isdir(), filter="fully_trusted")
    else:
        archive.extract(member, into, set_attrs=not member.isdir())


def check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    """Refuse a member that could write outside the tree it is extracted into: an
    absolute path, a ``..`` component, a link whose target leaves the tree, or a device,
    fifo or other special file."""
    name = PurePosixPath(member.name)
    problem = _path_problem(name, "path")
    if problem is None and member.issym():
        problem = _path_problem(name.parent / member.linkname, f"symlink to {member.linkname!r}")
    elif problem is None and member.islnk():
        problem = _path_problem(PurePosixPath(member.linkname),
                                f"hard link to {member.linkname!r}")
    elif problem is None and not (member.isfile() or member.isdir()):
        problem = "a device, fifo or other special file"
    if problem is not None:
        raise KernelError(f"{archive}: refusing member {member.name!r}: {problem}")


def _path_problem(path: PurePosixPath, what: str) -> str | None:
    if path.is_absolute():
        return f"{what} is absolute"
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return f"{what} leaves the tree"
    return None


def _debian_tarball(cache: Path, say: Callable[[str], None]) -> tuple[Path, str]:
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Version}", DEBIAN_SOURCE_PACKAGE],
                               capture_output=True, text=True, check=False)
    if installed.returncode == 0 and DEBIAN_SOURCE_TARBALL.is_file():
        return DEBIAN_SOURCE_TARBALL, installed.stdout.strip()
    downloads = writable_dir(cache / "downloads")
    if shutil.which("apt-get") is None:
        raise KernelError(f"no kernel source: {DEBIAN_SOURCE_PACKAGE} is not installed and "
                          f"there is no apt-get; pass --source DIR with a Linux tree")
    deb = _download_source_package(downloads, say)
    version = _dpkg_deb(["-f", str(deb), "Version"], deb).strip()
    unpacked = downloads / deb.stem
    if not unpacked.is_dir():
        with staging_beside(unpacked) as staging:
            _dpkg_deb(["-x", str(deb), str(staging)], deb)
            staging.rename(unpacked)
    tarball = unpacked / DEBIAN_SOURCE_TARBALL.relative_to("/")
    if not tarball.is_file():
        raise KernelError(f"{deb} holds no {DEBIAN_SOURCE_TARBALL}; delete {downloads} and "
                          f"run umtt-kernel build again")
    return tarball, version


def _download_source_package(downloads: Path, say: Callable[[str], None]) -> Path:
    """``apt-get download`` the source package into ``downloads`` (apt writes it under a
    partial name and renames it when complete); the .deb's path."""
    say(f"downloading {DEBIAN_SOURCE_PACKAGE} with apt-get")
    fetched = subprocess.run(["apt-get", "download", DEBIAN_SOURCE_PACKAGE], cwd=downloads,
                             capture_output=True, text=True, check=False)
    debs = sorted(downloads.glob(f"{DEBIAN_SOURCE_PACKAGE}_*.deb"))
    if fetched.returncode != 0 or not debs:
        reason = fetched.stderr.strip()[-500:] or f"exit {fetched.returncode}"
        raise KernelError(f"apt-get download {DEBIAN_SOURCE_PACKAGE} failed: {reason}. Check "
                          f"that the package archive is reachable (sudo apt-get update), or "
                          f"install it (sudo apt-get install {DEBIAN_SOURCE_PACKAGE}), then "
                          f"run umtt-kernel build again")
    return debs[-1]


def _dpkg_deb(arguments: list[str], deb: Path) -> str:
    result = subprocess.run(["dpkg-deb", *arguments], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise KernelError(f"dpkg-deb {arguments[0]} {deb} failed: "
                          f"{result.stderr.strip()[-500:]}; delete {deb} and run "
                          f"umtt-kernel build again")
    return result.stdout


# --- patches --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KernelPatch:
    """A small change of ours to the kernel's source (``data/patches``), applied with
    ``patch -p1`` before building; each says in its text why it is needed."""

    name: str
    text: bytes


def shipped_patches(coverage: bool = False) -> list[KernelPatch]:
    """The patches shipped with the package, in the order they apply; with ``coverage``,
    those a coverage kernel needs too (``data/patches-coverage``: a source of their own,
    so every other kernel keeps its key)."""
    folders = ["data/patches", *(["data/patches-coverage"] if coverage else [])]
    return [patch for folder in folders for patch in _patches_in(folder)]


def _patches_in(folder: str) -> list[KernelPatch]:
    entries = resources.files("pytest_umtt").joinpath(folder).iterdir()
    return sorted((KernelPatch(entry.name.removesuffix(".patch"), entry.read_bytes())
                   for entry in entries if entry.name.endswith(".patch")),
                  key=lambda patch: patch.name)


def patched_source(source: KernelSource, patches: Sequence[KernelPatch], cache: Path,
                   say: Callable[[str], None]) -> KernelSource:
    """``source`` with ``patches`` applied, in a copy of hard links beside it under the
    cache (``patch`` replaces the files it changes, so the original stays as it was)."""
    if not patches:
        return source
    material = source.identity.encode() + b"".join(p.name.encode() + p.text for p in patches)
    digest = hashlib.sha256(material).hexdigest()[:12]
    target = writable_dir(cache / "src") / f"{source.path.name}+umtt-{digest}"
    names = "\n".join(patch.name for patch in patches)
    with FileLock(str(target) + ".lock"):
        if not (target / ".umtt-patches").is_file():
            ensure_build_tools(say)
            say(f"applying {len(patches)} patch(es) of pytest-umtt to a copy of {source.path}")
            try:
                _make_patched_copy(source.path, target, patches, names)
            except KernelError as exc:
                if source.default:
                    raise
                # A tree of the user's own may be another version, or carry the fix:
                # it builds as it is, and its kernel names no patch.
                say(f"warning: building {source.path} unpatched: {exc}")
                return replace(source, patches=())
    return KernelSource(target, source.version, f"{source.identity}\npatches {digest}\n{names}",
                        source.default, tuple(p.name for p in patches))


def _make_patched_copy(tree: Path, target: Path, patches: Sequence[KernelPatch],
                       names: str) -> None:
    with staging_beside(target) as staging:
        copy = staging / "tree"
        subprocess.run(["cp", "-al", str(tree), str(copy)], check=True)
        for patch in patches:
            _apply_patch(copy, patch)
        (copy / ".umtt-patches").write_text(names + "\n")
        shutil.rmtree(target, ignore_errors=True)
        copy.rename(target)


def _apply_patch(tree: Path, patch: KernelPatch) -> None:
    result = subprocess.run(["patch", "-p1", "--batch", "--forward", "-d", str(tree)],
                            input=patch.text, capture_output=True, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace").strip()[-800:]
        raise KernelError(f"patch {patch.name} (pytest_umtt/data/patches) does not apply to "
                          f"this source: {output}")


# --- build ----------------------------------------------------------------------------

def missing_build_tools() -> list[str]:
    """Debian packages whose tools a UML build needs but this machine lacks."""
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool) is None]
    if not LIBELF_HEADER.is_file():
        missing.append("libelf-dev")
    if _find_depmod() is None:
        missing.append("kmod")
    return missing


def ensure_build_tools(say: Callable[[str], None]) -> None:
    """Install missing build tools with apt-get when root, else say exactly what is missing."""
    missing = missing_build_tools()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise KernelError(f"missing build dependencies: {', '.join(missing)}; "
                          f"install them with: sudo {' '.join(command)}")
    say(f"installing build dependencies: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise KernelError(f"could not install {', '.join(missing)}: "
                          f"{result.stderr.strip()[-500:]}")


def kernel_key(source: KernelSource, fragment: str) -> str:
    """Cache key: the source's identity, the fragment and the recipe version."""
    material = f"{RECIPE_VERSION}\n{source.identity}\n{fragment}"
    return hashlib.sha256(material.encode()).hexdigest()[:16]


@dataclass
class BuildProgress:
    """Condenses make's output into one line: objects done and time spent."""

    label: str
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    started: float = field(default_factory=time.monotonic)
    objects: int = 0
    _last_shown: float = 0.0

    def line(self, text: str) -> None:
        if text.startswith(("  CC", "  AS", "  LD", "  AR")):
            self.objects += 1
        now = time.monotonic()
        if now - self._last_shown >= self._interval():
            self._last_shown = now
            self.show()

    def _interval(self) -> float:
        return 0.5 if self._isatty() else 15.0

    def _isatty(self) -> bool:
        return self.stream.isatty()

    def show(self, final: bool = False) -> None:
        elapsed = time.monotonic() - self.started
        text = f"{self.label}: {self.objects} objects, {elapsed:.0f} s"
        if self._isatty():
            self.stream.write(f"\r\x1b[K{text}" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def build_kernel(source: KernelSource, *, jobs: int | None = None, force: bool = False,
                 say: Callable[[str], None] = lambda _: None,
                 progress_stream: TextIO | None = None,
                 config: KernelConfig = DEFAULT_CONFIG) -> Path:
    """Build (or reuse) the kernel for ``source`` with the shipped fragment and what
    ``config`` adds (:mod:`pytest_umtt.kconfig`); its path. Modules (``=m``) are built
    too, and installed beside it (:func:`modules_dir`)."""
    source, merged, final_dir = _variant(source, config, say)
    kernels, key = writable_dir(final_dir.parent), final_dir.name
    with FileLock(str(final_dir) + ".lock"):
        if not (final_dir / "linux").is_file() or force:
            ensure_build_tools(say)
            _build_and_publish(source, merged, final_dir, jobs=jobs or os.cpu_count() or 1,
                               say=say, stream=progress_stream or sys.stderr,
                               variant=config.describe(), tree=object_tree(source, config))
        if config.empty:
            _mark_default(kernels, key, source)
    return final_dir / "linux"


def _variant(source: KernelSource, config: KernelConfig,
             say: Callable[[str], None]) -> tuple[KernelSource, MergedConfig, Path]:
    """The patched source, the merged config and the cache directory of the kernel they
    make: how a build and a look-up name the same kernel."""
    cache = writable_dir(cache_root())
    source = patched_source(source, shipped_patches(coverage=config.coverage), cache, say)
    merged = merge(config, source.path)
    return source, merged, cache / "kernels" / kernel_key(source, merged.text)


def gcov_link_problem(source: Path) -> str | None:
    """Why a kernel with UML's gcov (``CONFIG_GCOV``) cannot link here, if it cannot:
    it is linked with the host compiler's libgcov.a, and gcc 12's defines a global
    ``mangle_path``, as the kernel's fs/seq_file.c does (``multiple definition of
    `mangle_path'`, after a near-full build). Asked of ``nm`` in a second instead."""
    library = subprocess.run(["gcc", "-print-file-name=libgcov.a"], capture_output=True,
                             text=True, check=False).stdout.strip()
    symbols = subprocess.run(["nm", "-g", "--defined-only", library], capture_output=True,
                             text=True, check=False).stdout
    seq_file = source / "fs" / "seq_file.c"
    ours = seq_file.is_file() and "char *mangle_path(" in seq_file.read_text(errors="replace")
    if ours and re.search(r" T mangle_path$", symbols, re.MULTILINE):
        return (f"UML's gcov kernel cannot link with this compiler: {library} defines "
                f"mangle_path, and so does {seq_file} (ld: multiple definition of "
                f"`mangle_path')")
    return None


def object_tree(source: KernelSource, config: KernelConfig) -> str:
    """The object directory's name for ``config``'s kernels from ``source``: one per
    source for every variant (a changed fragment rebuilds incrementally), and one of their
    own for the sanitizer and coverage kernels, which recompile every object with other
    flags (sharing a tree, each switch between them and the rest would too)."""
    flavour = "".join(f"\0{name}" for name in config.variants)
    return hashlib.sha256(f"{source.identity}{flavour}".encode()).hexdigest()[:16]


def _build_and_publish(source: KernelSource, merged: MergedConfig, final_dir: Path, *,
                       jobs: int, say: Callable[[str], None], stream: TextIO,
                       variant: str, tree: str) -> None:
    if merged.requested.get("CONFIG_GCOV") == "y" and (
            problem := gcov_link_problem(source.path)) is not None:
        raise KernelError(f"{problem}; see README, Kernel coverage")
    cache = final_dir.parent.parent
    objdir = writable_dir(cache / "build" / tree)
    log = final_dir.with_name(f"{final_dir.name}.build.log")
    with FileLock(str(objdir) + ".lock"):
        missed = _run_build(source, objdir, merged, jobs=jobs, log=log, progress=BuildProgress(
            f"building Linux {source.version} for UML ({variant})", stream))
        for option in missed:
            say(f"warning: {option}: olddefconfig did not keep it (a dependency UML lacks?)")
        _publish(objdir, final_dir, log, source,
                 {"variant": variant, "requested": merged.requested, "did_not_take": missed})


def _run_build(source: KernelSource, objdir: Path, merged: MergedConfig, *, jobs: int,
               log: Path, progress: BuildProgress) -> list[str]:
    """Configure and build in ``objdir``; the user's options that did not take."""
    fragment_file = objdir / "umtt.config"
    fragment_file.write_text(merged.text)
    make = ["make", "-C", str(source.path), "ARCH=um", f"O={objdir}", *NO_TOOLCHAIN]
    merge_config = [str(source.path / "scripts" / "kconfig" / "merge_config.sh"), "-m", "-O",
                    str(objdir), str(objdir / ".config"), str(fragment_file)]
    shutil.rmtree(objdir / MODULES_STAGING, ignore_errors=True)
    with log.open("w") as out:
        for step in ([*make, "defconfig"], merge_config, [*make, "olddefconfig"]):
            _run_logged(step, out, log, progress, cwd=source.path)
        config_text = (objdir / ".config").read_text()
        _check_config(config_text, merged, log)
        _run_logged([*make, f"-j{jobs}", "linux"], out, log, progress, cwd=source.path)
        if MODULE_LINE.search(config_text):
            _run_logged([*make, f"-j{jobs}", "modules"], out, log, progress, cwd=source.path)
            _run_logged([*make, "modules_install", f"INSTALL_MOD_PATH={objdir / MODULES_STAGING}",
                         "INSTALL_MOD_STRIP=1", f"DEPMOD={_depmod()}"], out, log, progress,
                        cwd=source.path)
    progress.show(final=True)
    return did_not_take(config_text, merged)


MODULE_LINE = re.compile(r"^CONFIG_\w+=m$", re.MULTILINE)
MODULES_STAGING = "modules-install"
MODULES_DIR = "modules"
"""Beside a built kernel: ``lib/modules/RELEASE`` as modules_install wrote it."""


def _find_depmod() -> str | None:
    """depmod's path (modules_install runs it): /usr/sbin is not on every PATH."""
    return shutil.which("depmod", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")


def _depmod() -> str:
    found = _find_depmod()
    if found is None:
        raise KernelError("building modules needs depmod (sudo apt-get install kmod)")
    return found


BUILD_PATH = "/usr/bin:/bin"
NO_TOOLCHAIN = ("RUSTC=false", "BINDGEN=false", "PAHOLE=false")
"""Optional toolchains the kernel's Kconfig probes for: their versions become config
(CONFIG_RUSTC_VERSION, CONFIG_PAHOLE_VERSION), so one found on one machine and not on
another gave two kernels for one recipe. None is used by a UML kernel of ours."""


def build_environment() -> dict[str, str]:
    """What make runs with: a fixed PATH and locale, HOME, and the pinned build identity
    (REPRODUCIBLE_ENV); nothing else of the user's environment reaches the kernel."""
    return {"PATH": BUILD_PATH, "HOME": os.environ.get("HOME", "/"), "LC_ALL": "C",
            **REPRODUCIBLE_ENV}


def _run_logged(command: list[str], out: TextIO, log: Path, progress: BuildProgress,
                cwd: Path) -> None:
    out.write(f"$ {' '.join(command)}\n")
    env = build_environment()
    with _process_group(command, cwd, env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            progress.line(line)
        code = proc.wait()
    out.flush()
    if code != 0:
        raise KernelBuildError(f"kernel build step failed (exit {code}): {' '.join(command)}",
                               log, _tail(log))


@contextmanager
def _process_group(command: list[str], cwd: Path,
                   env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """Run ``command`` in its own process group; on any exit path, end the whole group."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            # SIGINT lets make delete the targets it was writing.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _check_config(config_text: str, merged: MergedConfig, log: Path) -> None:
    """Every option of pytest-umtt's fragment the user did not override must have
    survived olddefconfig, or say which did not."""
    actual = fragment_options(config_text)
    ours = {name: want for name, want in fragment_options(fragment_text()).items()
            if name not in merged.requested}
    wrong = [f"{name}={want} (got {actual.get(name, 'n')})"
             for name, want in ours.items() if actual.get(name, "n") != want]
    if wrong:
        raise KernelBuildError("the kernel config does not take these options: "
                               + ", ".join(wrong), log, _tail(log))


def _publish(objdir: Path, final_dir: Path, log: Path, source: KernelSource,
             variant: dict[str, object]) -> None:
    with staging_beside(final_dir) as staging:
        shutil.copy2(objdir / "linux", staging / "linux")
        (staging / PATCHES_FILE).write_text("".join(f"{name}\n" for name in source.patches))
        (staging / SOURCE_FILE).write_text(source_description(source) + "\n")
        shutil.copy2(objdir / ".config", staging / "config")
        shutil.copy2(log, staging / BUILD_LOG)
        modules = objdir / MODULES_STAGING / "lib" / "modules"
        if modules.is_dir():
            shutil.copytree(modules, staging / MODULES_DIR, symlinks=True,
                            ignore=shutil.ignore_patterns("build", "source"))
        if GCOV_LINE in (objdir / ".config").read_text().splitlines():
            _copy_coverage_notes(objdir, staging / COVERAGE_NOTES)
            variant = {**variant, "objdir": str(objdir)}  # where its counts would go
        (staging / VARIANT_FILE).write_text(json.dumps(variant, indent=2) + "\n")
        shutil.rmtree(final_dir, ignore_errors=True)
        staging.rename(final_dir)


GCOV_LINE = "CONFIG_GCOV=y"
COVERAGE_NOTES = "gcno"
"""Beside a coverage kernel: the compiler's .gcno notes, at their paths under the object
directory. The object directory is shared by every variant and rebuilt by the next
build, so a coverage report reads the notes kept here."""


def _copy_coverage_notes(objdir: Path, target: Path) -> None:
    for note in objdir.rglob("*.gcno"):
        relative = note.relative_to(objdir)
        if relative.parts[0] == MODULES_STAGING:
            continue
        (target / relative.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy2(note, target / relative)


def coverage_notes(kernel: Path) -> tuple[Path, Path] | None:
    """A coverage kernel's notes (:data:`COVERAGE_NOTES`) and the object directory it was
    compiled in (where its .gcda files would go), or None for any other kernel."""
    directory = kernel.resolve().parent
    try:
        objdir = json.loads((directory / VARIANT_FILE).read_text()).get("objdir")
    except (OSError, ValueError, AttributeError):
        return None
    notes = directory / COVERAGE_NOTES
    return (notes, Path(objdir)) if isinstance(objdir, str) and notes.is_dir() else None


def source_description(source: KernelSource) -> str:
    """One line naming a kernel's source: ``linux-source-6.12 6.12.118-1~deb12u1`` for
    Debian's package, else the tree's version, path and git state."""
    if source.default:
        return f"{DEBIAN_SOURCE_PACKAGE} {source.version}"
    return f"Linux {source.version} from {source.identity.replace(chr(10), ' ')}"


def modules_dir(kernel: Path) -> Path | None:
    """The modules ``umtt-kernel build`` installed beside ``kernel`` (the directory that
    holds ``RELEASE/``), if it built any."""
    found = kernel.resolve().parent / MODULES_DIR
    return found if found.is_dir() else None


VARIANT_FILE = "variant.json"
"""Beside a built kernel: what was asked of it, and which of the user's options did not take."""


def _mark_default(kernels: Path, key: str, source: KernelSource) -> None:
    if not source.default:
        return
    link = kernels / "default"
    staging = kernels / f"default.{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(key)
    staging.replace(link)


def _tail(log: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    try:
        with log.open(errors="replace") as stream:
            return [line.rstrip("\n") for line in deque(stream, maxlen=lines)]
    except OSError:
        return []


def kernel_version(path: Path) -> str | None:
    """The release a kernel binary was built from ("6.12.117"), if it says."""
    try:
        found = re.search(rb"Linux version (\S+)", path.read_bytes())
    except OSError:
        return None
    return found.group(1).decode(errors="replace") if found else None


PINNED_BANNER = re.compile(rb"\(umtt@umtt\) .* #1 .*1970")
"""What umtt-kernel pins in the version string (REPRODUCIBLE_ENV), as ``uname -v`` shows it."""


@dataclass(frozen=True, slots=True)
class KernelIdentity:
    """What names a kernel binary exactly: its version banner and its sha256."""

    banner: str
    sha256: str
    patches: tuple[str, ...] = ()
    modules: str | None = None
    """sha256 over the modules installed beside the kernel (names and contents), if any:
    the guest loads them, so they are part of the run."""
    variant: str = "default"
    """What was asked of the kernel beside pytest-umtt's fragment (``variant.json``)."""
    source: str | None = None
    """Where it was built from (:func:`source_description`), if its build left a record."""

    @property
    def pinned(self) -> bool:
        """Whether the banner carries no build counter, time, user or host of its own."""
        return PINNED_BANNER.search(self.banner.encode()) is not None

    def __str__(self) -> str:
        """Banner and sha256 only: they name the binary wherever it lies (the patches
        file beside a built kernel does not travel with a copy, and runs are compared by
        this text)."""
        text = f"{self.banner} (sha256:{self.sha256[:12]})"
        return text if self.modules is None else f"{text} (modules sha256:{self.modules[:12]})"

    @property
    def provenance(self) -> str:
        """Its source and which of pytest-umtt's patches it was built with, as far as
        known."""
        source = f"from {self.source}" if self.source else "source not recorded"
        if self.patches:
            return f"{source}, built with pytest-umtt's patches: {' '.join(self.patches)}"
        return f"{source}; no record of pytest-umtt's patches beside it"


FileVersion = tuple[Path, int, int]
_identities: dict[FileVersion, KernelIdentity] = {}
_checks: dict[FileVersion, KernelCheck] = {}


def _file_version(path: Path) -> FileVersion:
    """What changes when the file does: the answers about a kernel binary are cached by
    it, since every machine's boot asks (reading 8 MB costs ~18 ms each time)."""
    info = path.stat()
    return path.resolve(), info.st_mtime_ns, info.st_size


def kernel_identity(path: Path) -> KernelIdentity:
    """The banner (``Linux version ... #1 ...``) and sha256 of a kernel binary."""
    key = _file_version(path)
    if key not in _identities:
        data = path.read_bytes()
        found = re.search(rb"Linux version [^\n\0]*", data)
        banner = found.group(0).decode(errors="replace").strip() if found else "unknown"
        modules = modules_dir(path)
        _identities[key] = KernelIdentity(banner, hashlib.sha256(data).hexdigest(),
                                          _patches_beside(path),
                                          None if modules is None else tree_digest(modules),
                                          _variant_beside(path), source_beside(path))
    return _identities[key]


def tree_digest(root: Path) -> str:
    """sha256 over every file under ``root``: relative path, link target or contents."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_symlink():
            digest.update(b"L" + os.readlink(path).encode())
        elif path.is_file():
            digest.update(b"F" + path.read_bytes())
    return digest.hexdigest()


def _variant_beside(kernel: Path) -> str:
    try:
        variant = json.loads((kernel.resolve().parent / VARIANT_FILE).read_text())
        return str(variant.get("variant", "default"))
    except (OSError, ValueError, AttributeError):
        return "default"


VIRTIO_CONSOLE_MARKER = b"virtio_console"
_consoles: dict[FileVersion, bool] = {}


def has_virtio_console(path: Path) -> bool:
    """Whether a kernel binary has the virtio-console driver (the guest agent's
    interrupt-driven command channel needs it; without, the agent polls)."""
    key = _file_version(path)
    if key not in _consoles:
        _consoles[key] = VIRTIO_CONSOLE_MARKER in path.read_bytes()
    return _consoles[key]


def _patches_beside(kernel: Path) -> tuple[str, ...]:
    """The patches ``umtt-kernel build`` recorded next to a kernel it built."""
    try:
        return tuple((kernel.resolve().parent / PATCHES_FILE).read_text().split())
    except OSError:
        return ()


BUILT_FROM = re.compile(r"^\$ make -C (\S+)")
DEBIAN_TREE = re.compile(rf"^({re.escape(DEBIAN_SOURCE_PACKAGE)})_([^+/]+)(\+umtt-\w+)?$")


def source_beside(kernel: Path) -> str | None:
    """What ``umtt-kernel build`` recorded about a kernel's source next to it: the
    ``source`` file, or (kernels built before it was written) the tree its build log
    names."""
    directory = kernel.resolve().parent
    try:
        return (directory / SOURCE_FILE).read_text().strip() or None
    except OSError:
        pass
    try:
        with (directory / BUILD_LOG).open(errors="replace") as log:
            found = BUILT_FROM.match(log.readline())
    except OSError:
        return None
    if found is None:
        return None
    tree = Path(found.group(1)).name
    debian = DEBIAN_TREE.match(tree)
    return f"{debian.group(1)} {debian.group(2)}" if debian else f"Linux tree {tree}"


def default_kernel() -> Path | None:
    """The kernel ``umtt-kernel build`` made from the default source, if there is one."""
    path = cache_root() / "kernels" / "default" / "linux"
    return path if path.is_file() else None


# --- check ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KernelCheck:
    """What a kernel binary supports, as far as its contents tell."""

    path: Path
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    schedshm: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def check_kernel(path: Path) -> KernelCheck:
    """Can this binary run under ``time-travel=ext`` (with the shared-memory scheduler)?"""
    if not path.is_file():
        return _check_kernel(path)
    key = _file_version(path)
    if key not in _checks:
        _checks[key] = _check_kernel(path)
    return _checks[key]


def _check_kernel(path: Path) -> KernelCheck:
    if not path.is_file():
        return KernelCheck(path, (f"{path} does not exist or is not a file",), ())
    if not os.access(path, os.X_OK):
        return KernelCheck(path, (f"{path} is not executable",), ())
    data = path.read_bytes()
    if not data.startswith(b"\x7fELF"):
        return KernelCheck(path, (f"{path} is not an ELF executable",), ())
    if TIME_TRAVEL_MARKER not in data:
        what = "a User-Mode Linux kernel" if UML_MARKER in data else "an executable"
        return KernelCheck(path, (
            f"{path} is {what} without time-travel=ext support "
            f"(CONFIG_UML_TIME_TRAVEL_SUPPORT is off; Debian's user-mode-linux package is "
            f"built that way). Build one with: umtt-kernel build",), ())
    warnings: list[str] = []
    if SCHEDSHM_MARKER not in data:
        warnings.append(f"{path} has time-travel=ext but not the shared-memory scheduler "
                        f"(Linux 6.11 and later): it will be served over messages, much slower")
    identity = kernel_identity(path)
    if not identity.pinned:
        warnings.append(f"{path}: the version string is not pinned ({identity.banner!r}): the "
                        f"kernel mixes it into the guest's entropy, so a rebuild gives other "
                        f"runs for one seed; build with KBUILD_BUILD_VERSION=1 "
                        f"KBUILD_BUILD_TIMESTAMP='1970-01-01 00:00:00 UTC' "
                        f"KBUILD_BUILD_USER=umtt KBUILD_BUILD_HOST=umtt (umtt-kernel build does)")
    return KernelCheck(path, (), tuple(warnings), SCHEDSHM_MARKER in data)


# --- deterministic entropy ------------------------------------------------------------

def build_shim(say: Callable[[str], None] = lambda _: None) -> Path | None:
    """Compile the getrandom shim into the cache; None (with a reason said) without a compiler."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        say("warning: no C compiler (cc): the getrandom shim cannot be built, "
            "runs will not be deterministic")
        return None
    source = resources.files("pytest_umtt").joinpath("data/umtt_getrandom.c").read_bytes()
    key = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    target_dir = cache_root() / "shim" / key
    target = target_dir / SHIM_NAME
    if target.is_file():  # a read-only cache with the shim built is fine
        return target
    writable_dir(target_dir.parent)
    with FileLock(str(target_dir) + ".lock"):
        if target.is_file():
            return target
        with staging_beside(target_dir) as staging:
            (staging / "umtt_getrandom.c").write_bytes(source)
            result = subprocess.run(
                [compiler, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(staging / SHIM_NAME),
                 str(staging / "umtt_getrandom.c")], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise KernelError(f"compiling the getrandom shim failed: {result.stderr.strip()}")
            staging.rename(target_dir)
    return target


# --- command line ---------------------------------------------------------------------

def _say(text: str) -> None:
    print(f"umtt-kernel: {text}", file=sys.stderr, flush=True)


def variant_kernel(config: KernelConfig, *, source: Path | None = None,
                   say: Callable[[str], None] = lambda _: None) -> Path:
    """Where the kernel for ``config`` (built from ``source``, default Debian's) is or
    will be, without building it."""
    return variant_location(config, source=source, say=say)[1] / "linux"


def variant_location(config: KernelConfig, *, source: Path | None = None,
                     say: Callable[[str], None] = lambda _: None) -> tuple[KernelSource, Path]:
    """The (patched) source the kernel for ``config`` is built from, and the cache
    directory it is or will be published in."""
    tree = user_source(source) if source else debian_source(writable_dir(cache_root()), say)
    patched, _merged, directory = _variant(tree, config, say)
    return patched, directory


def _config_of(args: argparse.Namespace) -> KernelConfig:
    return KernelConfig(tuple(Path(p).absolute() for p in args.kconfig),
                        tuple(Path(p).absolute() for p in args.kunitconfig),
                        tuple(args.kselftest_config), tuple(args.kconfig_add),
                        debug=args.debug, coverage=args.coverage)


def _cmd_build(args: argparse.Namespace) -> int:
    cache = writable_dir(cache_root())
    source = user_source(Path(args.source)) if args.source else debian_source(cache, _say)
    started = time.monotonic()
    path = build_kernel(source, jobs=args.jobs, force=args.force, say=_say,
                        config=_config_of(args))
    _say(f"kernel ready in {time.monotonic() - started:.1f} s")
    if build_shim(_say) is None:
        _say("warning: runs will not be deterministic without the getrandom shim")
    print(path)
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    config = _config_of(args)
    path = default_kernel() if config.empty and not args.source else variant_kernel(
        config, source=Path(args.source) if args.source else None, say=_say)
    if path is None or not path.is_file():
        flags = " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
        _say(f"no such kernel in {cache_root()}; build it with: umtt-kernel build {flags}")
        return 1
    print(path)
    return 0


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", metavar="DIR",
                        help=f"Linux tree to build (default: Debian's {DEBIAN_SOURCE_PACKAGE})")
    parser.add_argument("--kconfig", nargs="+", default=[], metavar="FILE",
                        help="config fragments merged over pytest-umtt's, in order")
    parser.add_argument("--kunitconfig", nargs="+", default=[], metavar="FILE",
                        help="KUnit .kunitconfig files, merged like fragments")
    parser.add_argument("--kselftest-config", nargs="+", default=[], metavar="TARGET",
                        help="the config file of these kselftest targets (e.g. gpio)")
    parser.add_argument("--kconfig-add", nargs="+", default=[], metavar="CONFIG_X=V",
                        help="single options, merged last (e.g. CONFIG_GPIO_SIM=m)")
    parser.add_argument("--debug", action="store_true",
                        help="the sanitizer kernel: KASAN, UBSAN, lockdep, DEBUG_OBJECTS "
                             "(pytest_umtt/data/debug.config)")
    parser.add_argument("--coverage", action="store_true",
                        help="the coverage kernel: gcov over the whole kernel "
                             "(pytest_umtt/data/coverage.config)")


def _cmd_check(args: argparse.Namespace) -> int:
    result = check_kernel(Path(args.path))
    for problem in result.problems:
        print(f"umtt-kernel: {problem}", file=sys.stderr)
    for warning in result.warnings:
        print(f"umtt-kernel: warning: {warning}", file=sys.stderr)
    if result.ok:
        print(f"{args.path}: time-travel=ext supported"
              + (", with the shared-memory scheduler" if result.schedshm else ""))
    return 0 if result.ok else 1


def _cmd_shim(_args: argparse.Namespace) -> int:
    path = build_shim(_say)
    if path is None:
        return 1
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``umtt-kernel``."""
    parser = argparse.ArgumentParser(prog="umtt-kernel",
                                     description="Build and check time-travel UML kernels.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) a time-travel UML kernel")
    _add_config_flags(build)
    build.add_argument("--jobs", "-j", type=int, metavar="N", help="parallel jobs (default: CPUs)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(run=_cmd_build)
    path = commands.add_parser("path", help="print a built kernel's path (the default one, "
                               "or the one the same flags would build)")
    _add_config_flags(path)
    path.set_defaults(run=_cmd_path)
    check = commands.add_parser("check", help="does a kernel support time-travel=ext?")
    check.add_argument("path", metavar="PATH")
    check.set_defaults(run=_cmd_check)
    commands.add_parser("shim", help="build the getrandom shim; print its path").set_defaults(
        run=_cmd_shim)
    args = parser.parse_args(argv)
    code: int = run_step("umtt-kernel", args.command, lambda: int(args.run(args)), _say)
    return code


if __name__ == "__main__":
    sys.exit(main())
