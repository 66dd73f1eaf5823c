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
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .kernel import default_kernel, kernel_identity
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
                        len(fingerprint))


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
