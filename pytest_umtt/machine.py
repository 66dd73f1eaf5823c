"""UML machines: the kernel command line and the teardown of a UML process tree.

The machine object (boot, console in virtual time, guest agent) grows here; what is
here now is what every caller that starts a UML kernel needs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

DEFAULT_TIME_TRAVEL_START = 1_700_000_000 * 10**9
"""The guest's wall clock at virtual time 0 (2023-11-14), fixed so its date is reproducible."""

SHIM_SEED_ENV = "UMTT_SEED"


HOSTFS_PREFIX = "/proc/self/cwd"
"""hostfs resolves every path under this prefix in the UML kernel process, whose working
directory is the machine directory. (A relative prefix such as ``.`` fails with EBADF.)"""

HOST_ROOT_FROM_CWD = "../" * 64
"""The root mount, relative to that: enough ``..`` to reach ``/`` from any directory, so
the command line names no per-run path."""

GUEST_MOUNT = "/run/umtt"
"""Where the guest sees its machine directory (read-write); everything else is read-only."""

SOCKET_FROM_MACHINE_DIR = "../time.sock"
"""The calendar's socket, relative to each machine's directory (its parent is the
simulation's directory)."""


def uml_command(
    kernel: Path,
    *,
    client_id: int,
    boot_script: str = "boot.sh",
    mem: str = "128M",
    time_travel_start: int = DEFAULT_TIME_TRAVEL_START,
    socket_path: str = SOCKET_FROM_MACHINE_DIR,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that boots ``kernel`` under ``time-travel=ext``.

    Run it with the machine's directory as the working directory: the host's root is
    mounted read-only through hostfs (DESIGN.md fact 2), the machine directory is
    mounted read-write at /run/umtt, and ``boot_script`` there becomes init. Every path
    is relative, so the command line is the same in every run and on every host: the
    kernel mixes it into its entropy pool, and "same seed, same run" depends on it.
    UML's own runtime files (``uml_dir``) stay in the machine directory too.
    """
    init = (f"mount -t tmpfs -o mode=0755 none /run && mkdir {GUEST_MOUNT} && "
            f"mount -t hostfs -o . none {GUEST_MOUNT} && exec {GUEST_MOUNT}/{boot_script}")
    return [
        str(kernel),
        f"mem={mem}",
        "root=/dev/root",
        "rootfstype=hostfs",
        f"hostfs={HOSTFS_PREFIX}",
        f"rootflags={HOST_ROOT_FROM_CWD}",
        "ro",
        "con=null",
        "con0=fd:0,fd:1",
        "uml_dir=.",
        "umid=uml",
        # time-travel-start= must come first: __setup matching is by prefix (§4).
        f"time-travel-start={time_travel_start}",
        f"time-travel=ext:{client_id}:{socket_path}",
        *extra,
        "init=/bin/sh",
        "--",
        "-c",
        f'"{init}"',
    ]


def uml_environment(shim: Path | None, seed: int,
                    base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The host environment for a UML process: the getrandom shim seeded with ``seed``."""
    env = dict(os.environ if base is None else base)
    if shim is not None:
        env["LD_PRELOAD"] = str(shim)
        env[SHIM_SEED_ENV] = str(seed)
    return env


def derive_seed(run_seed: int, machine: str) -> int:
    """Each machine's own entropy seed: one run seed, distinct streams per machine."""
    digest = hashlib.sha256(f"{run_seed}/{machine}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def kill_process_tree(pid: int, timeout: float = 5.0) -> list[int]:
    """Kill ``pid`` and every descendant (UML runs a host process per guest process);
    the pids that were still alive."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    if alive:
        raise RuntimeError(f"processes survived SIGKILL: {[p.pid for p in alive]}")
    return [p.pid for p in procs]
