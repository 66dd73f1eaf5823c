"""Out-of-tree kernel modules built against a kernel variant (``make M=DIR``).

A variant's object directory is shared by every variant (kernel.py builds them all in one
tree, one after another), so a module is not built there: each variant gets a small
tree of its own under ``<cache>/extmod/<KEY>``, made once from the variant's published
config with ``make modules_prepare`` (generated headers, modpost; no kernel objects).
The variant keeps no Module.symvers (it builds none without ``=m`` options), so modpost
is told to warn about the kernel's symbols instead of refusing them; the kernel checks
them again at load time, and the variant's config has no MODVERSIONS (UML's defconfig).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from .cache import cache_root, writable_dir
from .errors import KernelBuildError, KernelError
from .kconfig import KernelConfig
from .kernel import NO_TOOLCHAIN, build_environment, variant_location

PREPARED_MARK = ".umtt-modules-prepared"
"""Written last in a prepared tree: one without it was interrupted and is made again."""
LOG_TAIL = 30


def build_module(module_dir: Path, into: Path, config: KernelConfig, *,
                 source: Path | None = None,
                 say: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Build the module whose Kbuild (or Makefile) is in ``module_dir`` against the
    variant ``config`` (which must be built: ``umtt-kernel build``); the .ko files,
    copied into ``into``. ``module_dir`` is left as it was (the build runs in a copy)."""
    tree, directory = variant_location(config, source=source, say=say)
    if not (directory / "linux").is_file():
        raise KernelError(f"no kernel for variant {config.describe()} in {directory}; "
                          f"build it first (umtt-kernel build {_flags(config)})")
    if not ((module_dir / "Kbuild").is_file() or (module_dir / "Makefile").is_file()):
        raise KernelError(f"{module_dir}: no Kbuild or Makefile (an out-of-tree module's "
                          f"directory has one naming its objects: obj-m := NAME.o)")
    prepared = _prepared_tree(tree.path, directory, say)
    with tempfile.TemporaryDirectory(prefix="umtt-module-") as scratch:
        work = Path(scratch) / module_dir.name
        shutil.copytree(module_dir, work)
        log = prepared / f"module-{module_dir.name}.log"
        log.unlink(missing_ok=True)
        _make(tree.path, prepared, [f"M={work}", "KBUILD_MODPOST_WARN=1", "modules"], log)
        built = sorted(work.rglob("*.ko"))
        if not built:
            raise KernelError(f"{module_dir}: make M= built no .ko file")
        into.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(ko, into / ko.name)) for ko in built]


def _flags(config: KernelConfig) -> str:
    return " ".join(f"--{name}" for name in config.variants) or "..."


def _prepared_tree(source: Path, variant_dir: Path, say: Callable[[str], None]) -> Path:
    """``<cache>/extmod/<KEY>``: the variant's config and what ``make modules_prepare``
    makes of it, made once under a lock."""
    prepared = writable_dir(cache_root() / "extmod") / variant_dir.name
    with FileLock(str(prepared) + ".lock"):
        if not (prepared / PREPARED_MARK).is_file():
            say(f"preparing {prepared} for out-of-tree modules")
            shutil.rmtree(prepared, ignore_errors=True)
            prepared.mkdir()
            shutil.copy2(variant_dir / "config", prepared / ".config")
            log = prepared / "modules_prepare.log"
            _make(source, prepared, ["olddefconfig"], log)
            _make(source, prepared, ["modules_prepare"], log)
            (prepared / PREPARED_MARK).write_text(f"{variant_dir}\n")
    return prepared


def _make(source: Path, objdir: Path, arguments: list[str], log: Path) -> None:
    command = ["make", "-C", str(source), "ARCH=um", f"O={objdir}", *NO_TOOLCHAIN,
               *arguments]
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                env=build_environment(), check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
        raise KernelBuildError(f"module build step failed (exit {result.returncode}): "
                               f"{' '.join(command)}", log, tail)
