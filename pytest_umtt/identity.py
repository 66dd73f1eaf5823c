"""What a run's inputs are, by digest and by source, and how two of them differ.

A run is a function of its seed, the kernel binary and the guest root. Digests tell
whether two kernels or roots are the same; this module also says *why* two differ, in
the terms a person can act on: the kernel's source package version and pytest-umtt's
patches, the root's Debian package versions. Records are plain dicts (JSON in a replay
bundle's manifest and in the canary's golden file).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .kernel import kernel_identity
from .rootfs import Rootfs

KEY_PACKAGES = ("libc6", "bash", "coreutils", "python3.11-minimal")
"""The root's packages a header names by version (the rest: ``umtt-rootfs show``)."""
MAX_LISTED = 12
"""Differences listed by name before "and N more"."""

Record = dict[str, Any]


def kernel_record(kernel: Path) -> Record:
    """A kernel binary's identity: sha256, banner, source and pytest-umtt's patches."""
    identity = kernel_identity(kernel)
    return {"sha256": identity.sha256, "banner": identity.banner,
            "source": identity.source, "patches": list(identity.patches),
            "variant": identity.variant, "modules": identity.modules}


def root_record(rootfs: Rootfs | None) -> Record | None:
    """The pinned root's digest and ``name=version`` packages; None for the host's root."""
    if rootfs is None:
        return None
    return {"digest": rootfs.digest, "packages": list(rootfs.packages)}


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """``{"bash": "5.2.15-2+b7", ...}`` from ``name=version`` entries."""
    return dict(entry.partition("=")[::2] for entry in packages)


def root_summary(packages: Sequence[str]) -> str:
    """The root's package count and the versions of the packages most runs depend on."""
    versions = package_versions(packages)
    named = ", ".join(f"{name} {versions[name]}" for name in KEY_PACKAGES if name in versions)
    return f"{len(packages)} Debian packages" + (f": {named}, ..." if named else "")


def _listed(items: Sequence[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED])
    more = len(items) - MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def package_differences(expected: Sequence[str], found: Sequence[str]) -> list[str]:
    """Each package whose version differs, or that only one side has, as
    ``bash 5.2.15-2+b2 (expected) / 5.2.15-2+b7 (here)``."""
    want, have = package_versions(expected), package_versions(found)
    lines = []
    for name in sorted(want.keys() | have.keys()):
        if name not in have:
            lines.append(f"{name} {want[name]} (expected) / missing (here)")
        elif name not in want:
            lines.append(f"{name} missing (expected) / {have[name]} (here)")
        elif want[name] != have[name]:
            lines.append(f"{name} {want[name]} (expected) / {have[name]} (here)")
    return lines


def root_differences(expected: Mapping[str, Any] | None,
                     found: Mapping[str, Any] | None) -> list[str]:
    """Why two guest roots differ (empty when they are the same image)."""
    if expected is None or found is None:
        if expected is found:
            return []
        side = "expected" if expected is None else "here"
        return [f"guest root: the host's / through hostfs ({side}) against a pinned root"]
    if expected["digest"] == found["digest"]:
        return []
    packages = package_differences(expected.get("packages", []), found.get("packages", []))
    digests = (f"guest root sha256:{str(expected['digest'])[:12]} (expected) / "
               f"sha256:{str(found['digest'])[:12]} (here)")
    if not expected.get("packages"):
        return [f"{digests}; the expected root's package versions were not recorded"]
    if not packages:
        return [f"{digests}, from the same package versions (another pytest-umtt recipe)"]
    return [f"{digests}; packages that differ: {_listed(packages)}"]


def kernel_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Why two kernel binaries differ (empty when they are the same binary): source
    version, pytest-umtt's patches, the banner (compiler), else the build itself. A field
    only one record has (an older record) is left out."""
    if (expected["sha256"], expected.get("modules")) == (found["sha256"], found.get("modules")):
        return []
    lines = [f"kernel sha256:{str(expected['sha256'])[:12]} (expected) / "
             f"sha256:{str(found['sha256'])[:12]} (here)"]
    fields = [name for name in FIELD_NAMES if name in expected and name in found]
    for name in fields:
        want, have = expected[name], found[name]
        if name == "modules":
            want, have = (str(v)[:12] if v else "none" for v in (want, have))
        if want != have:
            lines.append(f"{FIELD_NAMES[name]}: {_shown(want)} (expected) / "
                         f"{_shown(have)} (here)")
    if len(lines) == 1 and len(fields) == len(FIELD_NAMES):
        lines.append("same source, patches, banner, variant and modules: another build")
    return lines


FIELD_NAMES = {"source": "kernel source", "patches": "pytest-umtt's kernel patches",
               "variant": "kernel variant", "banner": "kernel banner",
               "modules": "kernel modules sha256"}


def _shown(value: object) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value) if value else "not recorded"
