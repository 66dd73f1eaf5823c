"""Where pytest-umtt keeps what it builds, and how a build step publishes its result.

Kernel sources, kernels, the getrandom shim, the pinned root and kselftest trees live
under one cache directory (:func:`cache_root`). Every step builds in a staging directory
beside its target (:func:`staging_beside`) and renames it into place when complete, so an
interrupted or failed step (Ctrl-C, a full disk, an unreachable package archive) leaves
nothing a later run takes for complete; the command-line tools report such a failure
with what to run next (:func:`run_step`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CacheError


def cache_root() -> Path:
    """``$UMTT_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-umtt``, else ``~/.cache/pytest-umtt``."""
    explicit = os.environ.get("UMTT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pytest-umtt"


def writable_dir(path: Path) -> Path:
    """``path``, created if needed and checked writable, or a CacheError saying so."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CacheError(f"cache directory {path} is not usable: {exc.strerror or exc} "
                         f"(set UMTT_CACHE_DIR to a writable directory)") from None
    return path


@contextmanager
def staging_beside(target: Path) -> Iterator[Path]:
    """A fresh directory next to ``target`` to build it whole in; the caller renames it
    (or something in it) into place, and whatever is left is removed on every exit path,
    so an interrupted step never leaves a ``target`` that looks finished."""
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_step(tool: str, command: str, step: Callable[[], int],
             say: Callable[[str], None]) -> int:
    """Run a command-line tool's ``step``; a failure is said with what to do next and
    becomes exit status 1 (130 for Ctrl-C), never a traceback."""
    again = f"{tool} {command}"
    try:
        return step()
    except CacheError as exc:
        say(str(exc))
        return 1
    except OSError as exc:
        # A full disk or a cache taken away mid-step: what was half-written was in a
        # staging directory, and is gone.
        say(f"{command} failed: {exc}; nothing half-built was kept. Free space in "
            f"{cache_root()} (or set UMTT_CACHE_DIR), then run {again} again")
        return 1
    except KeyboardInterrupt:
        say(f"interrupted; nothing half-built was kept (run {again} again to go on)")
        return 130
