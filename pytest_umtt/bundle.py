"""Replay bundles: one file holding everything a test's run depends on.

A run is a function of its seed, the kernel binary, the guest root and the test's code.
A bundle carries them all, so that a failure seen on one machine replays on another with
an empty cache and no compiler: the kernel and its modules (with the records of its
source, patches and variant),
the getrandom shim (its source and the compiled library), the seed and every setting
that changes the run, the node id, the test file and its conftests, pytest-umtt's
version, and the run's fingerprint to compare the replay with.

The file is a plain tar whose large members are xz-compressed one by one (the stdlib's
``lzma``), with ``manifest.json`` naming each member and the sha256 of its content. The
guest root (the 30.5 MB image the kernel loads, 24.6 MB in xz) is the same for every test
of a session, so bundles written into one artifacts directory share it: it is stored
once, compressed and named by its digest, in ``umtt-store/`` beside them, and each
manifest names it.
``umtt-bundle pack`` puts it inside a bundle for a file that travels alone; a replay
looks for it inside the bundle first, then in ``umtt-store/`` next to the bundle or in
a directory above it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import os
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path, PurePosixPath
from typing import IO, Any

from filelock import FileLock

from .errors import BundleError, KernelError
from .identity import kernel_record, root_record
from .kernel import (
    MODULES_DIR,
    PATCHES_FILE,
    SHIM_NAME,
    SOURCE_FILE,
    VARIANT_FILE,
    extract_members,
    kernel_identity,
    modules_dir,
    tree_digest,
)
from .rootfs import BOOT_IMAGE_NAME, IMAGE_NAME, Rootfs

FORMAT = 1
SUFFIX = ".umtt-bundle"
MANIFEST = "manifest.json"
STORE = "umtt-store"
"""Beside bundles: their shared guest roots, compressed, named by digest."""
KERNEL = "kernel/linux.xz"
KERNEL_PATCHES = "kernel/patches"
KERNEL_SOURCE = "kernel/source"
KERNEL_VARIANT = "kernel/variant.json"
MODULES = "kernel/modules.tar.xz"
"""The kernel's modules (``lib/modules/RELEASE`` as modules_install wrote it), if any."""
SHIM = f"shim/{SHIM_NAME}.xz"
SHIM_SOURCE = "shim/umtt_getrandom.c"
ROOT = "root/image.xz"
"""The root as the kernel loads it (the lz4 boot image, or the cpio where there is none)."""
FINGERPRINT = "run/fingerprint.txt.xz"
TEST_FILES = "test-files/"
XZ_PRESET = 0
"""xz's fastest preset: the root's 28 MB lz4 image compressed to 22.5 MB in about 9 s
here (30.5 MB to 24.6 MB since the driver selftests' tools joined the root; on the raw
cpio preset 6 took ten times as long as preset 0 for 15% less), the
kernel to 3.2 MB in about 1 s; a failing test should not wait long."""
CHUNK = 1 << 20
MAX_MEMBER = 1 << 31
"""No member may unpack to more than 2 GiB: a bundle is input, and input is bounded."""
MAX_MANIFEST = 1 << 20
STORE_SEARCH_DEPTH = 3


def store_name(digest: str) -> str:
    """The shared root's file name in ``umtt-store/``."""
    return f"{digest}.cpio.xz"


# --- what a run depends on --------------------------------------------------------------

@dataclass
class RunRecord:
    """What a bundle is written from: the run's inputs and what it did."""

    nodeid: str
    seed: int
    settings: dict[str, Any]
    """Every setting that changes the run (seed excepted), after markers."""
    markers: dict[str, Any]
    kernel: Path
    rootfs: Rootfs | None
    shim: Path | None
    test_files: dict[str, Path]
    """Relative name (to pytest's rootdir) -> file: the test file and its conftests."""
    fingerprint: list[str]
    outcome: dict[str, str]
    machines: dict[str, Any] = field(default_factory=dict)
    schedule: list[dict[str, Any]] | None = None
    """The perturbed decisions the run kept (a shrunk schedule; every other decision
    reverted); None: every decision the seed makes applies."""


def package_version() -> str:
    """pytest-umtt's version and a digest of its own files (a checkout can differ from
    the release it claims to be)."""
    try:
        version = metadata.version("pytest-umtt")
    except metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    package = Path(__file__).parent
    for path in sorted(package.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".c", ".patch", ".config", ".packages",
                                              ".sh"):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return f"{version} (files sha256:{digest.hexdigest()[:12]})"


def fingerprint_digest(lines: Sequence[str]) -> str:
    """The digest by which two runs are compared (as ``--umtt-check-determinism`` does)."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def test_files(test: Path, rootdir: Path) -> dict[str, Path]:
    """The test's file and every conftest.py from its directory up to ``rootdir``."""
    found = {str(test.relative_to(rootdir)): test}
    directory = test.parent
    while True:
        conftest = directory / "conftest.py"
        if conftest.is_file():
            found[str(conftest.relative_to(rootdir))] = conftest
        if directory == rootdir or rootdir not in directory.parents:
            return found
        directory = directory.parent


# --- writing ----------------------------------------------------------------------------

_compressed: dict[str, bytes] = {}
"""sha256 -> xz of a kernel or shim: compressed once per process, put in every bundle."""


def _xz(data: bytes) -> bytes:
    key = hashlib.sha256(data).hexdigest()
    if key not in _compressed:
        _compressed[key] = lzma.compress(data, preset=XZ_PRESET)
    return _compressed[key]


class _Writer:
    """Members into a tar with fixed metadata (the same run gives the same bundle)."""

    def __init__(self, stream: IO[bytes]) -> None:
        # Closed by the caller once the manifest, always last, is in.
        self.tar = tarfile.open(fileobj=stream, mode="w",  # noqa: SIM115
                                format=tarfile.PAX_FORMAT)
        self.members: dict[str, dict[str, Any]] = {}

    def add(self, name: str, data: bytes, *, stored: bytes | None = None,
            content: Mapping[str, Any] | None = None) -> None:
        """``data`` as member ``name`` (``stored`` instead when given: its compressed
        form); the manifest records the sha256 and size of ``data`` (or ``content``)."""
        payload = data if stored is None else stored
        self.members[name] = dict(content) if content is not None else {
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        if stored is not None and content is None:
            # Trailing bytes after an xz stream would not change what it unpacks to.
            self.members[name]["stored_sha256"] = hashlib.sha256(stored).hexdigest()
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(payload), 0o644, 0
        self.tar.addfile(info, io.BytesIO(payload))

    def add_file(self, name: str, source: Path, content: Mapping[str, Any]) -> None:
        """A member straight from a file (an already compressed root)."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = source.stat().st_size, 0o644, 0
        self.members[name] = dict(content)
        with source.open("rb") as stream:
            self.tar.addfile(info, stream)


def loaded_image(rootfs: Rootfs) -> Path:
    """The bytes the kernel loads (the compressed boot image where there is one): what
    the root's digest names, and what a bundle carries."""
    return rootfs.boot_image or rootfs.image


def ensure_stored_root(rootfs: Rootfs, store: Path) -> Path:
    """The root compressed in ``store``, done once per store: concurrent writers (xdist
    workers) wait for the one that compresses, which renames its file into place whole.
    An image that is not what its digest says (a damaged cache) is refused by name."""
    target = store / store_name(rootfs.digest)
    if target.is_file():
        return target
    store.mkdir(parents=True, exist_ok=True)
    with FileLock(str(store / ".lock")):
        if target.is_file():
            return target
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            _compress_checked(loaded_image(rootfs), partial, rootfs.digest)
            partial.replace(target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _compress_checked(image: Path, out_path: Path, digest: str) -> None:
    found = hashlib.sha256()
    with image.open("rb") as source, lzma.open(out_path, "wb", preset=XZ_PRESET) as out:
        while chunk := source.read(CHUNK):
            found.update(chunk)
            out.write(chunk)
    if found.hexdigest() != digest:
        raise BundleError(f"the guest root {image} has sha256 {found.hexdigest()[:16]}, but "
                          f"its manifest says {digest[:16]}: the cache is damaged (or was "
                          f"rebuilt under this run); rebuild it with `umtt-rootfs build "
                          f"--force`")


def write_bundle(record: RunRecord, target: Path, *, store: Path | None = None) -> Path:
    """Write ``record`` as a bundle at ``target``; the guest root goes into ``store``
    (shared) when given, else into the bundle itself."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as stream:
            writer = _Writer(stream)
            manifest = _manifest(record)
            _add_kernel(writer, record.kernel)
            _add_shim(writer, record.shim, manifest)
            manifest["root"] = _add_root(writer, record.rootfs, store)
            for name, path in sorted(record.test_files.items()):
                writer.add(TEST_FILES + name, path.read_bytes())
            fingerprint = "\n".join(record.fingerprint).encode()
            writer.add(FINGERPRINT, fingerprint,
                       stored=lzma.compress(fingerprint, preset=XZ_PRESET))
            manifest["members"] = writer.members
            text = json.dumps(manifest, indent=2, sort_keys=True).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode, info.mtime = len(text), 0o644, 0
            writer.tar.addfile(info, io.BytesIO(text))
            writer.tar.close()
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _manifest(record: RunRecord) -> dict[str, Any]:
    return {
        "format": FORMAT, "pytest_umtt": package_version(), "nodeid": record.nodeid,
        "seed": record.seed, "settings": record.settings, "markers": record.markers,
        "kernel": kernel_record(record.kernel),
        "test_files": {name: hashlib.sha256(path.read_bytes()).hexdigest()
                       for name, path in sorted(record.test_files.items())},
        "fingerprint": {"sha256": fingerprint_digest(record.fingerprint),
                        "items": len(record.fingerprint)},
        "outcome": record.outcome, "machines": record.machines,
        **({} if record.schedule is None else {"schedule": record.schedule}),
    }


def _add_kernel(writer: _Writer, kernel: Path) -> None:
    data = kernel.read_bytes()
    writer.add(KERNEL, data, stored=_xz(data))
    identity = kernel_identity(kernel)
    writer.add(KERNEL_PATCHES, "".join(f"{name}\n" for name in identity.patches).encode())
    writer.add(KERNEL_SOURCE, f"{identity.source or ''}\n".encode())
    variant = kernel.resolve().parent / VARIANT_FILE
    if variant.is_file():
        writer.add(KERNEL_VARIANT, variant.read_bytes())
    modules = modules_dir(kernel)
    if modules is not None:
        tree = tree_tar(modules)
        writer.add(MODULES, tree, stored=_xz(tree))


def tree_tar(root: Path) -> bytes:
    """A directory as an uncompressed tar that depends only on its contents (sorted
    names, no times, no owners)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            info = tar.gettarinfo(str(path), str(path.relative_to(root)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with path.open("rb") as stream:
                    tar.addfile(info, stream)
            else:
                tar.addfile(info)
    return out.getvalue()


def _add_shim(writer: _Writer, shim: Path | None, manifest: dict[str, Any]) -> None:
    source = resources.files("pytest_umtt").joinpath("data/umtt_getrandom.c").read_bytes()
    writer.add(SHIM_SOURCE, source)
    manifest["shim"] = shim is not None
    if shim is not None:
        data = shim.read_bytes()
        writer.add(SHIM, data, stored=_xz(data))


def _add_root(writer: _Writer, rootfs: Rootfs | None,
              store: Path | None) -> dict[str, Any] | None:
    record = root_record(rootfs)
    if rootfs is None or record is None:
        return None
    content = {"sha256": rootfs.digest, "size": loaded_image(rootfs).stat().st_size}
    record["size"] = content["size"]
    record["boot_image"] = rootfs.boot_image is not None
    if store is None:
        with tempfile.TemporaryDirectory(prefix="umtt-bundle-") as scratch:
            writer.add_file(ROOT, ensure_stored_root(rootfs, Path(scratch)), content)
        record["member"] = ROOT
    else:
        ensure_stored_root(rootfs, store)
        record["store"] = f"{STORE}/{store_name(rootfs.digest)}"
    return record


# --- reading ----------------------------------------------------------------------------

@dataclass
class Bundle:
    """A bundle read back and checked, its kernel, root and shim unpacked into a directory."""

    path: Path
    manifest: dict[str, Any]
    kernel: Path
    rootfs: Rootfs | None
    shim: Path | None
    fingerprint: list[str]
    test_files: dict[str, bytes]

    @property
    def nodeid(self) -> str:
        return str(self.manifest["nodeid"])

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.manifest["settings"])

    @property
    def schedule(self) -> list[dict[str, Any]] | None:
        """The decisions a shrunk run kept (None: the seed's own run)."""
        schedule = self.manifest.get("schedule")
        return None if schedule is None else list(schedule)

    @property
    def fingerprint_sha256(self) -> str:
        return str(self.manifest["fingerprint"]["sha256"])


class _Reader:
    """The members of a bundle file, each checked against the manifest as it is read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.tar = tarfile.open(path, mode="r:")  # noqa: SIM115 (closed by close())
        except (OSError, tarfile.TarError) as exc:
            raise BundleError(f"{path} is not a replay bundle: {exc}") from None
        try:
            self.names = {member.name: member for member in self.tar.getmembers()}
            self.manifest = self._manifest()
        except BaseException:
            self.tar.close()
            raise
        self.checked: set[str] = set()

    def _manifest(self) -> dict[str, Any]:
        member = self.names.get(MANIFEST)
        if member is None or member.size > MAX_MANIFEST:
            raise BundleError(f"{self.path}: no {MANIFEST} (or a huge one): not a replay "
                              f"bundle of pytest-umtt")
        stream = self.tar.extractfile(member)
        try:
            assert stream is not None
            manifest = json.loads(stream.read())
            members = manifest["members"]
            assert isinstance(members, dict) and manifest["format"] == FORMAT
        except (ValueError, KeyError, TypeError, AssertionError):
            raise BundleError(f"{self.path}: member {MANIFEST} is corrupt or of another "
                              f"format (this pytest-umtt reads format {FORMAT})") from None
        return dict(manifest)

    def close(self) -> None:
        self.tar.close()

    def stream(self, name: str) -> IO[bytes]:
        """A member's stored bytes, decompressed when its name ends in ``.xz``."""
        member = self.names.get(name)
        if member is None or not member.isfile():
            raise BundleError(f"{self.path}: member {name} is missing")
        raw = self.tar.extractfile(member)
        assert raw is not None
        return lzma.open(raw) if name.endswith(".xz") else raw

    def check_stored(self, name: str, expected: Mapping[str, Any]) -> None:
        """The member's stored (compressed) bytes, where the manifest gives their digest."""
        if "stored_sha256" not in expected:
            return
        raw = self.tar.extractfile(self.names[name])
        assert raw is not None
        digest = hashlib.sha256()
        while chunk := raw.read(CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != expected["stored_sha256"]:
            raise BundleError(f"{self.path}: member {name} is corrupt: its stored bytes have "
                              f"sha256 {digest.hexdigest()[:16]}, {MANIFEST} says "
                              f"{str(expected['stored_sha256'])[:16]}")

    def read(self, name: str) -> bytes:
        out = io.BytesIO()
        self.copy(name, out)
        return out.getvalue()

    def copy(self, name: str, out: IO[bytes]) -> None:
        """Unpack member ``name`` into ``out``, bounded, checked against the manifest."""
        expected = self.manifest["members"].get(name)
        if not isinstance(expected, dict):
            raise BundleError(f"{self.path}: member {name} is not in {MANIFEST}")
        copy_checked(self.stream(name), out, expected, f"{self.path}: member {name}")
        self.check_stored(name, expected)
        self.checked.add(name)

    def check_the_rest(self) -> None:
        """Every member the manifest names that was not read yet, read and checked."""
        for name in self.manifest["members"]:
            if name not in self.checked:
                self.copy(name, io.BytesIO())


def copy_checked(source: IO[bytes], out: IO[bytes], expected: Mapping[str, Any],
                 what: str) -> None:
    """Copy at most the expected size (and at most MAX_MEMBER); refuse a mismatch."""
    digest, size = hashlib.sha256(), 0
    limit = min(int(expected.get("size", MAX_MEMBER)), MAX_MEMBER)
    try:
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise BundleError(f"{what} is corrupt: longer than the {limit} bytes "
                                  f"{MANIFEST} gives")
            digest.update(chunk)
            out.write(chunk)
    except (lzma.LZMAError, EOFError, tarfile.TarError) as exc:
        raise BundleError(f"{what} is corrupt: {exc}") from None
    if digest.hexdigest() != expected.get("sha256"):
        raise BundleError(f"{what} is corrupt: sha256 {digest.hexdigest()[:16]}, "
                          f"{MANIFEST} says {str(expected.get('sha256'))[:16]}")


def _safe_member(name: str, where: Path) -> str:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise BundleError(f"{where}: refusing member {name!r}: it leaves the bundle")
    return name


def open_bundle(path: Path, into: Path) -> Bundle:
    """Read and check every member of bundle ``path``; unpack its kernel, shim and root
    into ``into`` (which the caller removes). A member that does not match its digest
    is refused by name."""
    with closing(_Reader(path)) as reader:
        return _unpack(reader, into)


def _unpack(reader: _Reader, into: Path) -> Bundle:
    path = reader.path
    for name in reader.manifest["members"]:
        _safe_member(name, path)
    manifest = reader.manifest
    kernel = into / "kernel" / "linux"
    kernel.parent.mkdir(parents=True, exist_ok=True)
    with kernel.open("wb") as out:
        reader.copy(KERNEL, out)
    kernel.chmod(0o755)
    (kernel.parent / PATCHES_FILE).write_bytes(reader.read(KERNEL_PATCHES))
    (kernel.parent / SOURCE_FILE).write_bytes(reader.read(KERNEL_SOURCE))
    if KERNEL_VARIANT in manifest["members"]:
        (kernel.parent / VARIANT_FILE).write_bytes(reader.read(KERNEL_VARIANT))
    if MODULES in manifest["members"]:
        _unpack_modules(reader, kernel.parent / MODULES_DIR)
    shim = None
    if manifest.get("shim"):
        shim = into / "shim" / SHIM_NAME
        shim.parent.mkdir(parents=True, exist_ok=True)
        shim.write_bytes(reader.read(SHIM))
    test_files = {name[len(TEST_FILES):]: reader.read(name)
                  for name in manifest["members"] if name.startswith(TEST_FILES)}
    fingerprint = reader.read(FINGERPRINT).decode().split("\n")
    reader.check_the_rest()
    return Bundle(path, manifest, kernel, _unpack_root(reader, into), shim,
                  fingerprint if fingerprint != [""] else [], test_files)


def _unpack_modules(reader: _Reader, target: Path) -> None:
    """The kernel's modules, each member checked before it is written (no absolute
    paths, no ``..``, no links out of the tree, no special files), then as a whole
    against the digest the manifest's kernel record gives."""
    where = reader.path / MODULES
    target.mkdir()
    try:
        with tarfile.open(fileobj=io.BytesIO(reader.read(MODULES)), mode="r:") as tree:
            extract_members(tree, target, where)
    except (KernelError, tarfile.TarError) as exc:
        raise BundleError(f"{reader.path}: member {MODULES} is not a modules tree: "
                          f"{exc}") from None
    expected = reader.manifest["kernel"].get("modules")
    if tree_digest(target) != expected:
        raise BundleError(f"{reader.path}: member {MODULES} unpacks to modules with sha256 "
                          f"{tree_digest(target)[:16]}, the manifest's kernel has "
                          f"{str(expected)[:16]}")


def _unpack_root(reader: _Reader, into: Path) -> Rootfs | None:
    record = reader.manifest.get("root")
    if record is None:
        return None
    boot = bool(record.get("boot_image"))
    image = into / "root" / (BOOT_IMAGE_NAME if boot else IMAGE_NAME)
    image.parent.mkdir(parents=True, exist_ok=True)
    content = {"sha256": record["digest"], "size": record.get("size", MAX_MEMBER)}
    with image.open("wb") as out:
        if record.get("member"):
            copy_checked(reader.stream(record["member"]), out, content,
                         f"{reader.path}: member {record['member']}")
        else:
            stored = find_stored_root(reader.path, str(record["digest"]))
            with lzma.open(stored) as source:
                copy_checked(source, out, content, f"{stored} (the bundle's guest root)")
    # Only the loaded image travels: it stands for the unpacked one too (which a replay
    # needs only to estimate a machine's memory; the run's own memory setting booted).
    return Rootfs(image, str(record["digest"]), tuple(record["packages"]),
                  image if boot else None)


def find_stored_root(bundle: Path, digest: str) -> Path:
    """The shared root a bundle names, in ``umtt-store/`` beside it or above it."""
    directory = bundle.resolve().parent
    for candidate in [directory, *directory.parents][:STORE_SEARCH_DEPTH]:
        stored = candidate / STORE / store_name(digest)
        if stored.is_file():
            return stored
    raise BundleError(
        f"{bundle}: its guest root (sha256:{digest[:12]}) is shared, not inside it, and "
        f"there is no {STORE}/{store_name(digest)} beside it or above it: copy the "
        f"artifacts directory's {STORE}/ along, or make a bundle that travels alone with "
        f"`umtt-bundle pack BUNDLE OUT` where the store is")


def changed_test_files(bundle: Bundle, rootdir: Path) -> list[str]:
    """The test files (test and conftests) that are not as the bundle recorded them."""
    changes = []
    for name, recorded in sorted(bundle.manifest["test_files"].items()):
        local = rootdir / name
        if not local.is_file():
            changes.append(f"{name}: not here (the bundle holds it as "
                           f"{TEST_FILES}{name})")
            continue
        now = hashlib.sha256(local.read_bytes()).hexdigest()
        if now != recorded:
            changes.append(f"{name} changed since the bundle was written (sha256 "
                           f"{recorded[:12]} then, {now[:12]} now)")
    return changes


# --- command line -----------------------------------------------------------------------

def pack(bundle: Path, output: Path) -> Path:
    """A copy of ``bundle`` with its shared root inside: one file that travels alone."""
    with closing(_Reader(bundle)) as reader:
        return _pack(reader, output)


def _pack(reader: _Reader, output: Path) -> Path:
    bundle = reader.path
    record = reader.manifest.get("root")
    with output.open("wb") as stream:
        writer = _Writer(stream)
        for name, content in reader.manifest["members"].items():
            member = reader.names.get(_safe_member(name, bundle))
            raw = None if member is None else reader.tar.extractfile(member)
            if raw is None:
                raise BundleError(f"{bundle}: member {name} is missing")
            writer.add(name, b"", stored=raw.read(), content=content)
        manifest = dict(reader.manifest)
        if record is not None and not record.get("member"):
            stored = find_stored_root(bundle, str(record["digest"]))
            writer.add_file(ROOT, stored, {"sha256": record["digest"], "size": record["size"]})
            manifest["root"] = {**record, "member": ROOT}
            manifest["root"].pop("store", None)
        manifest["members"] = writer.members
        text = json.dumps(manifest, indent=2, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mtime = len(text), 0
        writer.tar.addfile(info, io.BytesIO(text))
        writer.tar.close()
    return output


def describe(manifest: Mapping[str, Any]) -> Iterator[str]:
    """A bundle's manifest, for a person."""
    kernel, root = manifest["kernel"], manifest.get("root")
    yield f"test     {manifest['nodeid']} (seed {manifest['seed']})"
    outcome = manifest["outcome"]
    error = f": {outcome['error']}" if outcome.get("error") else ""
    yield f"outcome  {outcome.get('outcome')} in {outcome.get('when')}{error}"
    yield (f"kernel   sha256:{kernel['sha256'][:12]} from {kernel.get('source')}, patches "
           f"{' '.join(kernel.get('patches', [])) or 'none'}")
    yield ("root     host / (not in the bundle)" if root is None else
           f"root     sha256:{root['digest'][:12]} ({len(root['packages'])} Debian packages, "
           f"{'inside' if root.get('member') else root.get('store')})")
    yield f"settings {json.dumps(manifest['settings'], sort_keys=True)}"
    if manifest.get("markers"):
        yield f"markers  {json.dumps(manifest['markers'], sort_keys=True)}"
    if manifest.get("schedule") is not None:
        kept = manifest["schedule"]
        yield (f"schedule {len(kept)} perturbed decision{'' if len(kept) == 1 else 's'} kept, "
               f"every other reverted: " + ", ".join(str(d.get("key")) for d in kept))
    yield f"made by  pytest-umtt {manifest['pytest_umtt']}"
    yield (f"run      fingerprint {manifest['fingerprint']['sha256'][:16]} "
           f"({manifest['fingerprint']['items']} items)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``umtt-bundle``: ``show`` a bundle, ``pack`` its root into it."""
    parser = argparse.ArgumentParser(prog="umtt-bundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="what a bundle holds")
    show.add_argument("bundle", type=Path)
    packed = commands.add_parser("pack", help="a copy with the shared root inside it")
    packed.add_argument("bundle", type=Path)
    packed.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "show":
            with closing(_Reader(args.bundle)) as reader:
                print("\n".join(describe(reader.manifest)))
        else:
            out = pack(args.bundle, args.output)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    except BundleError as exc:
        print(f"umtt-bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
