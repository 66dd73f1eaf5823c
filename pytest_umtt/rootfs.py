"""A pinned guest root filesystem: Debian packages unpacked into a reproducible initramfs.

With the host's ``/`` as the guest root (hostfs), the host's bash, libc and /etc are
inputs of every run, and hostfs shows host inode numbers and directory order: two hosts
with other packages cannot give the same run. The pinned root is an initramfs built from
a fixed list of Debian packages (data/rootfs.packages) and read by the kernel at boot, so
the guest owns its inode numbers and directory order and the same image gives the same
run on every host. The image is a newc cpio written here byte by byte (sorted paths,
inode numbers counted from 1, every time 0, owner root), so one set of package versions
gives one digest; it is cached under ``<cache>/rootfs/<KEY>/`` like the kernel.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from filelock import FileLock

from .cache import cache_root, run_step, staging_beside, writable_dir
from .errors import RootfsError

RECIPE_VERSION = "1"
IMAGE_NAME = "rootfs.cpio"
BOOT_IMAGE_NAME = "rootfs.cpio.lz4"
"""What the kernel loads: the image compressed (lz4's legacy format, the one the kernel's
initramfs reader takes). The compressed copy and what it unpacks to are both in guest
memory while the kernel boots; uncompressed, a 128M machine could not hold both."""
LZ4 = ("lz4", "-l", "-9", "-q", "-f")
BOOT_MEMORY_BASE = 32 * 2**20
"""Guest memory a machine needs beside its root (kernel, agent), measured: with a 60.5 MiB
image compressed to 26.7 MiB, 120M boots and 112M does not."""
MEMORY_STEP = 8 * 2**20
MANIFEST_NAME = "manifest.json"
PRUNED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
          "usr/share/lintian", "usr/share/bash-completion", "usr/share/zsh", "usr/share/i18n",
          "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/python3.11/test",
          "usr/lib/python3.11/pydoc_data", "etc/init.d", "lib/systemd", "usr/lib/systemd",
          # Python modules for databases and NIS, whose libraries would double the size:
          "usr/lib/python3.11/lib-dynload/_dbm.cpython-311-x86_64-linux-gnu.so",
          "usr/lib/python3.11/lib-dynload/nis.cpython-311-x86_64-linux-gnu.so",
          "usr/lib/python3.11/lib-dynload/_curses_panel.cpython-311-x86_64-linux-gnu.so",
          # tc's ATM queue and libgpiod's C++ binding: the tools used need neither.
          "usr/lib/x86_64-linux-gnu/tc/q_atm.so",
          "usr/lib/x86_64-linux-gnu/libgpiodcxx.so.1.1.2",
          "usr/lib/x86_64-linux-gnu/libgpiodcxx.so.1",
          # udev: only udevadm (the selftests' `udevadm settle`); no hardware database,
          # no probes for disks, cameras or security keys.
          "usr/lib/udev/hwdb.d", "usr/lib/udev/ata_id", "usr/lib/udev/cdrom_id",
          "usr/lib/udev/dmi_memory_id", "usr/lib/udev/fido_id", "usr/lib/udev/mtd_probe",
          "usr/lib/udev/scsi_id", "usr/lib/udev/v4l_id", "usr/bin/systemd-hwdb",
          "usr/lib/udev/rules.d", "usr/share/initramfs-tools", "usr/share/bug",
          # diffutils' three-way and side-by-side tools; netsniff-ng's vendor and port
          # tables (for its sniffer; mausezahn is there for the tests that require it):
          "usr/bin/diff3", "usr/bin/sdiff", "etc/netsniff-ng",
          # socat's two diagnostic tools; netsniff-ng's tools but mausezahn:
          "usr/bin/filan", "usr/bin/procan", "usr/sbin/astraceroute", "usr/sbin/bpfc",
          "usr/sbin/curvetun", "usr/sbin/flowtop", "usr/sbin/ifpps", "usr/sbin/netsniff-ng",
          "usr/sbin/trafgen")
"""Documentation, translations and service files: never used by a test, a third of the size."""
MERGED_DIRS = ("bin", "sbin", "lib", "lib64")
"""Debian 12 merges these into /usr; packages still ship some files under the old names."""
SKELETON_DIRS = ("dev", "etc", "mnt", "proc", "root", "run", "sys", "tmp", "var/cache",
                 "var/log", "var/spool", "var/tmp", "usr/local/bin",
                 # Where the kernel's firmware loader looks first (the firmware selftests
                 # mount a tmpfs there):
                 "usr/lib/firmware")
SKELETON_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
}
SKELETON_LINKS = {"usr/bin/sh": "bash", "usr/bin/python3": "python3.11",
                  # What Debian's alternatives and base-files would link:
                  "usr/bin/awk": "mawk", "var/run": "/run"}
# The kernel opens /dev/console for init before anything can mount devtmpfs.
DEVICE_NODES = {"dev/console": (stat.S_IFCHR | 0o600, 5, 1),
                "dev/null": (stat.S_IFCHR | 0o666, 1, 3)}


@dataclass(frozen=True, slots=True)
class Rootfs:
    """A built image: where it is, its digest and the packages (with versions) inside."""

    image: Path
    digest: str
    packages: tuple[str, ...]
    boot_image: Path | None = None
    """The image as the kernel loads it (lz4-compressed); None: ``image`` itself."""

    @property
    def minimum_memory(self) -> int:
        """The least guest memory (bytes) a machine booting this root needs: the loaded
        image, what it unpacks to, and the kernel's own, rounded up to 8 MiB."""
        loaded = (self.boot_image or self.image).stat().st_size
        needed = self.image.stat().st_size + (loaded if self.boot_image else 0)
        needed += BOOT_MEMORY_BASE
        return -(-needed // MEMORY_STEP) * MEMORY_STEP

    @property
    def identity(self) -> str:
        """Short name for headers and traces: ``pinned sha256:0123456789ab``."""
        return f"pinned sha256:{self.digest[:12]}"


@dataclass(slots=True)
class Entry:
    """One file of the image: mode (with type), data, device numbers."""

    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def package_list(text: str | None = None) -> list[str]:
    """The package names of ``data/rootfs.packages`` (or of ``text``)."""
    if text is None:
        text = resources.files("pytest_umtt").joinpath("data/rootfs.packages").read_text()
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


APT_LISTS = Path("/var/lib/apt/lists")
"""apt's package lists: replaced (renamed into place) whenever ``apt-get update`` runs."""


def candidate_versions(packages: Sequence[str]) -> dict[str, str]:
    """The version apt would download for each package, remembered until apt's lists
    change (asking apt costs half a second, and every pytest session asks)."""
    remembered = cache_root() / "rootfs" / "candidates.json"
    stamp = f"{APT_LISTS.stat().st_mtime_ns if APT_LISTS.is_dir() else 0}"
    try:
        known = json.loads(remembered.read_text())
        if known["lists"] == stamp and known["packages"] == list(packages):
            return dict(known["versions"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    versions = _ask_apt(packages)
    try:
        remembered.parent.mkdir(parents=True, exist_ok=True)
        remembered.write_text(json.dumps({"lists": stamp, "packages": list(packages),
                                          "versions": versions}))
    except OSError:
        pass  # a read-only cache: ask again next time
    return versions


def _ask_apt(packages: Sequence[str]) -> dict[str, str]:
    """The candidate versions from apt; a clear error for unknown packages."""
    result = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages],
                            capture_output=True, text=True, check=False)
    versions: dict[str, str] = {}
    name = None
    for line in result.stdout.splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name is not None:
            versions.setdefault(name, line.split(": ", 1)[1])
    missing = [p for p in packages if p not in versions]
    if missing:
        raise RootfsError(f"apt knows no package {', '.join(missing)} "
                          f"(run apt-get update?): {result.stderr.strip()[-300:]}")
    return versions


def rootfs_key(pinned: Sequence[str]) -> str:
    """Cache key: the recipe (this module's own text: the skeleton and the pruning are
    in it), the compressor's version and every ``name=version`` that goes in."""
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    material = "\n".join([RECIPE_VERSION, recipe, compressor_version(), *sorted(pinned)])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def build_rootfs(packages: Sequence[str] | None = None, *, force: bool = False,
                 say: Callable[[str], None] = lambda _: None) -> Rootfs:
    """Build (or reuse) the pinned root filesystem; ``packages`` default to the shipped list."""
    names = list(packages) if packages is not None else package_list()
    if shutil.which("apt-get") is None:
        raise RootfsError("the pinned root filesystem is built from Debian packages and "
                          "needs apt-get (use the host root: --umtt-rootfs=host)")
    versions = candidate_versions(names)
    pinned = tuple(f"{name}={versions[name]}" for name in names)
    target = writable_dir(cache_root() / "rootfs") / rootfs_key(pinned)
    with FileLock(str(target) + ".lock"):
        if not force and (found := load_rootfs(target)) is not None:
            return found
        say(f"building the guest root filesystem from {len(pinned)} Debian packages")
        with staging_beside(target) as staging:
            _download(pinned, staging / "debs")
            image = build_image(sorted((staging / "debs").glob("*.deb")))
            (staging / IMAGE_NAME).write_bytes(image)
            compress_image(staging / IMAGE_NAME, staging / BOOT_IMAGE_NAME)
            shutil.rmtree(staging / "debs")
            # The run depends on the bytes the kernel loads, not only on what they unpack
            # to (two compressions of one image gave two runs): those name the root.
            digest = hashlib.sha256((staging / BOOT_IMAGE_NAME).read_bytes()).hexdigest()
            (staging / MANIFEST_NAME).write_text(json.dumps(
                {"digest": digest, "packages": list(pinned), "compressor": compressor_version(),
                 "image_sha256": hashlib.sha256(image).hexdigest()}, indent=2) + "\n")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
    built = load_rootfs(target)
    assert built is not None
    return built


def load_rootfs(directory: Path) -> Rootfs | None:
    """The image in ``directory``, if one was built there."""
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    image, boot_image = directory / IMAGE_NAME, directory / BOOT_IMAGE_NAME
    if not image.is_file() or not boot_image.is_file():
        return None
    return Rootfs(image, str(manifest["digest"]), tuple(manifest["packages"]), boot_image)


@functools.cache
def compressor_version() -> str:
    """``lz4 -V``'s first line ("none" without lz4): another version may compress the
    image to other bytes, and so give another root. Asked once per process: every
    session's root lookup needs it."""
    if shutil.which(LZ4[0]) is None:
        return "none"
    done = subprocess.run([LZ4[0], "-V"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "none"


def compress_image(image: Path, into: Path) -> None:
    """``image`` compressed as the kernel reads an initramfs (lz4 legacy format)."""
    if shutil.which(LZ4[0]) is None:
        raise RootfsError("compressing the guest root needs lz4 (sudo apt-get install lz4), "
                          "then run umtt-rootfs build again")
    done = subprocess.run([*LZ4, str(image), str(into)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RootfsError(f"lz4 could not compress {image}: {done.stderr.strip()[-300:]}")


def _download(pinned: Sequence[str], into: Path) -> None:
    into.mkdir()
    result = subprocess.run(["apt-get", "download", *pinned], cwd=into, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip()[-500:] or f"exit {result.returncode}"
        raise RootfsError(f"apt-get download of the guest root's packages failed: {reason}. "
                          f"Check that the package archive is reachable (sudo apt-get "
                          f"update), then run umtt-rootfs build again")


# --- the image --------------------------------------------------------------------------

def build_image(debs: Iterable[Path]) -> bytes:
    """The initramfs (newc cpio) of these packages, the skeleton and nothing else."""
    tree: dict[str, Entry] = {}
    for deb in debs:
        _unpack(deb, tree)
    _add_skeleton(tree)
    _check_libraries(tree)
    return write_cpio(tree)


def _unpack(deb: Path, tree: dict[str, Entry]) -> None:
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                          check=False)
    if data.returncode != 0:
        raise RootfsError(f"{deb.name} is not a readable package: {data.stderr.decode()}")
    with tarfile.open(fileobj=io.BytesIO(data.stdout)) as archive:
        for member in archive:
            path = _normalise(member.name)
            if path is None:
                continue
            if member.isdir():
                tree.setdefault(path, Entry(stat.S_IFDIR | 0o755))
            elif member.issym():
                tree[path] = Entry(stat.S_IFLNK | 0o777, member.linkname.encode())
            elif member.islnk():
                linked = tree.get(_normalise(member.linkname) or "")
                if linked is not None:
                    tree[path] = Entry(linked.mode, linked.data)
            elif member.isfile():
                stream = archive.extractfile(member)
                assert stream is not None
                tree[path] = Entry(stat.S_IFREG | (member.mode & 0o7777), stream.read())


def _normalise(name: str) -> str | None:
    """The path inside the image (``usr/bin/bash``), or None for what is pruned."""
    parts = PurePosixPath(name).parts
    parts = tuple(p for p in parts if p not in (".", ""))
    if not parts:
        return None
    if parts[0] in MERGED_DIRS:
        parts = ("usr", *parts)
    path = "/".join(parts)
    if any(path == p or path.startswith(p + "/") for p in PRUNED):
        return None
    return path


def _add_skeleton(tree: dict[str, Entry]) -> None:
    for merged in MERGED_DIRS:
        tree[merged] = Entry(stat.S_IFLNK | 0o777, f"usr/{merged}".encode())
    for directory in SKELETON_DIRS:
        mode = 0o1777 if directory.endswith("tmp") else 0o755
        tree[directory] = Entry(stat.S_IFDIR | mode)
    for path, text in SKELETON_FILES.items():
        tree[path] = Entry(stat.S_IFREG | 0o644, text.encode())
    for path, target in SKELETON_LINKS.items():
        tree.setdefault(path, Entry(stat.S_IFLNK | 0o777, target.encode()))
    for path, (mode, major, minor) in DEVICE_NODES.items():
        tree[path] = Entry(mode, rdev=(major, minor))
    for path in list(tree):
        for parent in PurePosixPath(path).parents:
            if str(parent) != ".":
                tree.setdefault(str(parent), Entry(stat.S_IFDIR | 0o755))


def _check_libraries(tree: dict[str, Entry]) -> None:
    """Every shared library a program of the image needs is in the image."""
    libraries = {PurePosixPath(p).name for p in tree
                 if p.startswith(("usr/lib/x86_64-linux-gnu/", "usr/lib64/"))}
    missing: dict[str, set[str]] = {}
    for path, entry in tree.items():
        if stat.S_ISREG(entry.mode) and entry.data[:4] == b"\x7fELF":
            for needed in elf_needed(entry.data):
                if needed not in libraries:
                    missing.setdefault(needed, set()).add(path)
    if missing:
        shown = "; ".join(f"{lib} (needed by {', '.join(sorted(users)[:3])})"
                          for lib, users in sorted(missing.items()))
        raise RootfsError(f"the package list lacks libraries: {shown}; add their packages "
                          f"to the list")


def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED names of a 64-bit little-endian ELF file (empty for anything else)."""
    if data[4:6] != b"\x02\x01":
        return []
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    segments = [struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    dynamic = [s for s in segments if s[0] == 2]  # PT_DYNAMIC
    if not dynamic:
        return []
    offset, size = dynamic[0][2], dynamic[0][5]
    entries = [struct.unpack_from("<qQ", data, offset + i) for i in range(0, size, 16)]
    strtab_addr = next((value for tag, value in entries if tag == 5), None)  # DT_STRTAB
    if strtab_addr is None:
        return []
    strtab = _address_to_offset(segments, strtab_addr)
    return [data[strtab + value:data.index(b"\0", strtab + value)].decode()
            for tag, value in entries if tag == 1]  # DT_NEEDED


def _address_to_offset(segments: list[tuple[int, int, int, int, int, int]], address: int) -> int:
    for kind, _flags, offset, vaddr, _paddr, filesz in segments:
        if kind == 1 and vaddr <= address < vaddr + filesz:  # PT_LOAD
            return offset + address - vaddr
    raise RootfsError(f"an ELF string table at {address:#x} lies in no loaded segment")


def write_cpio(tree: dict[str, Entry]) -> bytes:
    """A newc cpio archive of ``tree`` that depends on nothing but its contents."""
    out = io.BytesIO()
    for inode, path in enumerate(sorted(tree), start=1):
        entry = tree[path]
        _cpio_record(out, path, entry, inode)
    _cpio_record(out, "TRAILER!!!", Entry(0), 0)
    return out.getvalue()


def _cpio_record(out: io.BytesIO, name: str, entry: Entry, inode: int) -> None:
    encoded = name.encode() + b"\0"
    links = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (inode, entry.mode, 0, 0, links, 0, len(entry.data), 0, 0, *entry.rdev,
              len(encoded), 0)
    out.write(b"070701" + "".join(f"{value:08x}" for value in fields).encode())
    out.write(encoded)
    out.write(b"\0" * (-out.tell() % 4))
    out.write(entry.data)
    out.write(b"\0" * (-out.tell() % 4))


def cpio_paths(image: bytes) -> Iterator[tuple[str, int]]:
    """(path, mode) of every record of a newc archive; for tests and ``umtt-rootfs list``."""
    position = 0
    while True:
        header = image[position:position + 110]
        mode, size, name_size = (int(header[14:22], 16), int(header[54:62], 16),
                                 int(header[94:102], 16))
        name_start = position + 110
        name = image[name_start:name_start + name_size - 1].decode()
        if name == "TRAILER!!!":
            return
        data_start = name_start + name_size + (-(name_start + name_size) % 4)
        position = data_start + size + (-(data_start + size) % 4)
        yield name, mode


# --- command line -----------------------------------------------------------------------

def _say(text: str) -> None:
    print(f"umtt-rootfs: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``umtt-rootfs``: ``build`` (cached) prints the image's path."""
    parser = argparse.ArgumentParser(prog="umtt-rootfs",
                                     description="Build the pinned guest root filesystem.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or reuse) the image; print its path")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    commands.add_parser("show", help="the image's digest and packages")
    args = parser.parse_args(argv)

    def step() -> int:
        rootfs = build_rootfs(force=getattr(args, "force", False), say=_say)
        if args.command == "show":
            print(f"{rootfs.image}\n{rootfs.identity} ({rootfs.digest})")
            print("\n".join(f"  {package}" for package in rootfs.packages))
        else:
            print(rootfs.image)
        return 0

    return run_step("umtt-rootfs", "build", step, _say)


if __name__ == "__main__":
    sys.exit(main())
