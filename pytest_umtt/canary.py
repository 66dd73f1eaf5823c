"""A standard seeded run whose digest tells whether this host reproduces other hosts' runs.

``python -m pytest_umtt.canary [--kernel PATH] [--seed N]`` boots two machines on the
pinned root filesystem (one at time 0, one after a virtual second), reads guest entropy,
inode numbers, directory order and clocks, races two writers, and prints one JSON line:
the kernel's sha256, the root's digest, the seed and the digest of everything the run did
(protocol trace, console lines with their virtual times, command results). Two hosts with
the same kernel and root must print the same digest for one seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import UmttError
from .identity import kernel_differences, kernel_record, root_differences, root_record
from .kernel import MODULES_DIR, default_kernel, kernel_identity, modules_dir
from .rootfs import build_rootfs
from .simulation import Simulation

FIRST = ("od -An -N16 -tx1 /dev/urandom; cat /proc/sys/kernel/random/boot_id; "
         "ls -i /usr/bin/bash /etc/passwd; ls -f /etc | head -4; sleep 0.25; date +%s.%N")
RACE = ("delay() { echo 0.0$(( $(od -An -N1 -tu1 /dev/urandom) % 10 )); }; "
        "(sleep $(delay); echo first) & (sleep $(delay); echo second) & wait")
LATE = "cat /proc/uptime; date +%s.%N; od -An -N8 -tx1 /dev/urandom"


@dataclass(frozen=True, slots=True)
class CanaryResult:
    """What identifies the run's inputs, and the digest of the run."""

    kernel_sha256: str
    rootfs_digest: str
    seed: int
    digest: str
    items: int
    kernel: dict[str, Any] | None = None
    """The kernel's identity record (:func:`pytest_umtt.identity.kernel_record`)."""
    root: dict[str, Any] | None = None
    """The root's identity record: digest and package versions."""

    @property
    def key(self) -> str:
        """The inputs besides the seed: the kernel and the guest root."""
        return f"{self.kernel_sha256[:16]}/{self.rootfs_digest[:16]}"


def run_canary(kernel: Path, seed: int = 0) -> CanaryResult:
    """Run the canary once; the digest covers everything :meth:`Simulation.fingerprint`
    lists."""
    rootfs = build_rootfs()
    with Simulation(kernel=kernel, seed=seed, rootfs=rootfs) as sim:
        first = sim.machine("first")
        first.run(FIRST, check=True)
        first.run(RACE, check=True)
        sim.advance(1)
        sim.machine("late").run(LATE, check=True)
        fingerprint = sim.fingerprint()
    digest = hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()
    return CanaryResult(kernel_identity(kernel).sha256, rootfs.digest, seed, digest,
                        len(fingerprint), kernel_record(kernel), root_record(rootfs))


def golden_mismatch(result: CanaryResult, recorded: Mapping[str, Mapping[str, Any]]) -> str:
    """Why no golden digest applies to this host: for each recorded kernel and root, what
    differs (source version, patches, package versions) where the golden file says."""
    lines = [f"no golden digest for kernel/root {result.key} (this host)"]
    for key, entry in recorded.items():
        kernel_sha, root_digest = key.split("/")
        kernel = entry.get("kernel") or {"sha256": kernel_sha}
        root = entry.get("root") or {"digest": root_digest}
        here_kernel = result.kernel or {"sha256": result.kernel_sha256}
        here_root = result.root or {"digest": result.rootfs_digest}
        differences = kernel_differences(kernel, here_kernel)
        if differences and "source" not in kernel:
            differences.append("the golden kernel's source and patches were not recorded")
        differences += root_differences(root, here_root)
        lines.append(f"against {key}: " + "; ".join(differences))
    return "\n".join(lines)


def run_in_child(kernel: Path, prefix: Sequence[str] = (),
                 env: Mapping[str, str] | None = None, seed: int = 0) -> CanaryResult:
    """The canary in a child process started through ``prefix`` (``taskset -c 1``, say)."""
    command = [*prefix, sys.executable, "-m", "pytest_umtt.canary", f"--kernel={kernel}",
               f"--seed={seed}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300,
                          env=None if env is None else dict(env))
    if done.returncode != 0:
        raise UmttError(f"canary under {' '.join(prefix) or 'no prefix'} failed: "
                           f"{done.stderr[-2000:]}")
    fields = json.loads(done.stdout)
    del fields["key"]
    return CanaryResult(**fields)


@dataclass(frozen=True, slots=True)
class Variation:
    """A way the host may differ that must not change a run."""

    kernel: Path
    prefix: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None


def host_variations(kernel: Path, scratch: Path) -> dict[str, Variation]:
    """Host differences a run must not see: the environment, TMPDIR, the CPU, resource
    limits, the kernel's path and (as root) the hostname. Files go under ``scratch``."""
    moved = scratch / "elsewhere" / "vmlinux-copy"
    moved.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(kernel, moved)
    modules = modules_dir(kernel)
    if modules is not None:  # a kernel's modules are part of it: they travel with it
        shutil.copytree(modules, moved.parent / MODULES_DIR, symlinks=True)
    deep_tmp = scratch / ("deep" * 10)
    deep_tmp.mkdir(exist_ok=True)
    bare = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    if "PYTHONPATH" in os.environ:  # a checkout under test, not the installed package
        bare["PYTHONPATH"] = os.environ["PYTHONPATH"]
    last_cpu = max(os.sched_getaffinity(0))

    def shell(line: str) -> tuple[str, ...]:
        return ("bash", "-c", f'{line}; exec "$@"', "-")

    variations = {
        "as is": Variation(kernel),
        "empty environment": Variation(kernel, env=bare),
        "another TMPDIR": Variation(kernel, env={**os.environ, "TMPDIR": str(deep_tmp)}),
        f"pinned to CPU {last_cpu}": Variation(kernel, ("taskset", "-c", str(last_cpu))),
        "unlimited stack": Variation(kernel, shell("ulimit -s unlimited")),
        "core dumps on": Variation(kernel, shell("ulimit -c unlimited")),
        "kernel at another path": Variation(moved),
    }
    if os.geteuid() == 0:
        variations["another hostname"] = Variation(
            kernel, ("unshare", "-u", *shell("hostname other-host")))
    return variations


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: print the canary's result as one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m pytest_umtt.canary",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", type=Path, default=None,
                        help="kernel (default: the one umtt-kernel build made)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kernel = args.kernel or default_kernel()
    if kernel is None:
        print("no kernel: build one with umtt-kernel build", file=sys.stderr)
        return 1
    result = run_canary(kernel, args.seed)
    print(json.dumps({**asdict(result), "key": result.key}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
