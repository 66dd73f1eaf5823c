"""Starting a UML process: its command line, environment, what happens between fork and
exec, its pty, and ending its whole process tree.

Everything here is about the host process, not the guest: :func:`uml_command` builds a
command line that names no per-run or per-host path, :func:`uml_environment` a fixed
environment, :func:`fix_uml_process` runs in the child before exec (parent-death signal,
console output that stays blocking, resource limits, confinement by
:mod:`pytest_umtt.uml.confine`), :func:`spawn_uml` starts the process on a pty with all
of that, and :func:`kill_process_tree` ends it with every host process UML made.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import resource
import select
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path

import pexpect
import psutil

from ..errors import NS_PER_S, KillError
from .agent import BOOT_SCRIPT
from .confine import confine_to

DEFAULT_TIME_TRAVEL_START_NS = 1_700_000_000 * NS_PER_S
"""The guest's wall clock at virtual time 0 (2023-11-14), fixed so its date is reproducible."""

DEFAULT_MEM = "256M"
"""Memory of a machine: the pinned root filesystem lives in it (about 55 MB, and as
much again while the kernel unpacks it at boot)."""

SHIM_SEED_ENV = "UMTT_SHIM_SEED"
"""The getrandom shim's seed variable (a machine's own seed, derived from the run's)."""


HOSTFS_PREFIX = "/proc/self/cwd"
"""hostfs resolves every path under this prefix in the UML kernel process, whose working
directory is the machine directory. (A relative prefix such as ``.`` fails with EBADF.)"""

HOST_ROOT_FROM_CWD = "../" * 64
"""The root mount, relative to that: enough ``..`` to reach ``/`` from any directory, so
the command line names no per-run path."""

GUEST_MOUNT = "/mnt"
"""Where the guest sees its machine directory (read-write); everything else is read-only.
/mnt exists on every FHS host, so mounting there needs no mkdir (one process less: each
costs UML about 16 ms of wall time)."""

SOCKET_FROM_MACHINE_DIR = "../time.sock"
"""The calendar's socket, relative to each machine's directory (its parent is the
simulation's directory)."""

ROOTFS_FROM_MACHINE_DIR = "../rootfs.cpio"
"""The pinned root filesystem's image, linked into the simulation's directory: a relative
name keeps the command line the same on every host."""

UML_ENVIRONMENT = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
"""All of the host environment a UML process gets (plus the shim's): UML prints what it
finds in TMPDIR, so the host's variables would change the console."""


GCOV_DIR = ".gcov"
GCOV_ENVIRONMENT = {"GCOV_PREFIX": GCOV_DIR}
"""What a coverage kernel's UML process gets beside its environment: libgcov writes its
counts under this prefix (relative: from UML's working directory, its machine directory),
the one place a confined machine can write (:mod:`pytest_umtt.coverage`)."""


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` exits (or has) within ``timeout`` wall seconds: its pidfd
    becomes readable when it does."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


NO_ASLR = ("setarch", "-R")
"""Prefix that starts UML without host address-space randomisation. UML sizes its physical
memory around the host's layout ("exec-shield gap"), so with ASLR every boot gets another
memory map and runs with one seed differ. (setarch execs UML: the kernel's own command
line is unchanged.)"""


def uml_command(
    kernel: Path,
    *,
    client_id: int,
    boot_script: str = BOOT_SCRIPT,
    mem: str = DEFAULT_MEM,
    time_travel_start_ns: int = DEFAULT_TIME_TRAVEL_START_NS,
    socket_path: str = SOCKET_FROM_MACHINE_DIR,
    extra: Sequence[str] = (),
    rootfs: bool = False,
) -> list[str]:
    """The command line that boots ``kernel`` under ``time-travel=ext``.

    Run it with the machine's directory as the working directory: the host's root is
    mounted read-only through hostfs (DESIGN.md fact 2), the machine directory is
    mounted read-write at /mnt, and ``boot_script`` there becomes init. With ``rootfs``
    the root is instead the pinned image (:mod:`pytest_umtt.rootfs`) at
    ``ROOTFS_FROM_MACHINE_DIR``, unpacked into the guest's memory at boot. Every path
    is relative, so the command line is the same in every run and on every host: the
    kernel mixes it into its entropy pool, and "same seed, same run" depends on it.
    UML's own runtime files (``uml_dir``) stay in the machine directory too.
    """
    init = f"mount -t hostfs -o . none {GUEST_MOUNT} && exec {GUEST_MOUNT}/{boot_script}"
    if rootfs:
        # ramfs, not tmpfs: the kernel caps a tmpfs root at half of memory, counted while
        # the loaded image still holds its share (init/do_mounts.c init_rootfs).
        root = [f"initrd={ROOTFS_FROM_MACHINE_DIR}", "rootfstype=ramfs",
                f"hostfs={HOSTFS_PREFIX}"]
    else:
        root = ["root=/dev/root", "rootfstype=hostfs", f"hostfs={HOSTFS_PREFIX}",
                f"rootflags={HOST_ROOT_FROM_CWD}", "ro"]
    return [
        *NO_ASLR,
        str(kernel),
        f"mem={mem}",
        *root,
        "con=null",
        "con0=fd:0,fd:1",
        # The kernel's console stays UML's own (tty0), never a virtio console (hvc).
        "console=tty0",
        "uml_dir=.",
        "umid=uml",
        # Its own parameter, although "time-travel" is a prefix of it: the kernel tries the
        # built-in setup table in order, and that lists time-travel-start= first (§4).
        f"time-travel-start={time_travel_start_ns}",
        f"time-travel=ext:{client_id}:{socket_path}",
        *extra,
        "rdinit=/bin/bash" if rootfs else "init=/bin/bash",
        "--",
        "-c",
        f'"{init}"',
    ]


def uml_environment(shim: Path | None, seed: int) -> dict[str, str]:
    """The host environment for a UML process: a fixed minimal one, and the getrandom
    shim seeded with ``seed``."""
    env = dict(UML_ENVIRONMENT)
    if shim is not None:
        env["LD_PRELOAD"] = str(shim)
        env[SHIM_SEED_ENV] = str(seed)
    return env


UML_STACK_LIMIT = 8 * 1024 * 1024
"""The stack limit UML sets for itself (arch/um/os-Linux/main.c), set before it starts:
an unlimited stack also changes the host's memory layout for the process."""
PR_SET_PDEATHSIG = 1


def fix_uml_process(parent: int, confine: Path | None = None, cpu: int | None = None) -> None:
    """Between fork and exec of UML: die with the test process (even if it is SIGKILLed;
    UML's own helpers already die with UML), console output that stays blocking
    (:func:`separate_console_output`), fixed resource limits (UML prints the core-dump
    limits on its console), given a directory, confinement to it
    (:mod:`pytest_umtt.uml.confine`), and given a CPU, that CPU only (UML's helpers inherit
    it). ``parent`` is the test process's pid, taken before the fork."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    separate_console_output()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    soft = UML_STACK_LIMIT if hard == resource.RLIM_INFINITY else min(UML_STACK_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))
    if cpu is not None:
        with contextlib.suppress(OSError):  # taken away since chosen: unplaced, not different
            os.sched_setaffinity(0, {cpu})
    if confine is not None:
        confine_to(confine)


def separate_console_output() -> None:
    """In the child, before exec: give stdout and stderr an open file description of the
    pty of their own, apart from stdin's.

    pexpect dup2()s one slave descriptor onto 0, 1 and 2, so all three share one open
    file description, and O_NONBLOCK lives there, not in the descriptor. In time-travel
    modes UML makes its console output blocking (chan_kern.c, open_one_chan: a dup of
    fd 1 set blocking) and therefore registers no write interrupt. But enabling the
    input channel on fd 0 (line_setup_irq -> um_request_irq -> activate_fd ->
    os_set_fd_async) sets O_ASYNC | O_NONBLOCK on that shared description, so output
    becomes non-blocking after all. When the pty is momentarily full a write then gets
    EAGAIN, UML's 4 KiB line buffer fills, and the writer sleeps in n_tty_write for a
    tty_wakeup() that only the (absent) write interrupt would give: the guest process
    and, through its stderr, the agent hang for good. With its own description, fd 1
    stays blocking and every console write completes, as time travel requires.
    """
    fd = os.open(os.ttyname(0), os.O_RDWR | os.O_NOCTTY)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)




def derive_seed(run_seed: int, machine: str) -> int:
    """Each machine's own entropy seed: one run seed, distinct streams per machine."""
    digest = hashlib.sha256(f"{run_seed}/{machine}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def kill_process_tree(pid: int, timeout: float = 5.0, *, reap_root: bool = True) -> list[int]:
    """Kill ``pid`` and every descendant (UML runs a host process per guest process);
    the pids that were still alive. With ``reap_root=False`` the root is left for its
    owner (pexpect, say) to reap."""
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
    waited = procs if reap_root else procs[1:]
    _, alive = psutil.wait_procs(waited, timeout=timeout)
    if alive:
        raise KillError([p.pid for p in alive])
    return [p.pid for p in procs]




def spawn_uml(command: Sequence[str], directory: Path, env: Mapping[str, str], *,
              confined: bool, cpu: int | None = None) -> pexpect.spawn[bytes]:
    """Start ``command`` (from :func:`uml_command`) on a pty, in ``directory``, with
    ``env``: dying with this process, (``confined``) able to change ``directory`` only,
    and (given ``cpu``) on that CPU only (:mod:`pytest_umtt.placement`). Its pty is
    non-blocking: the calendar reads it when it has data."""
    preexec = functools.partial(fix_uml_process, os.getpid(), directory if confined else None,
                                cpu)
    process: pexpect.spawn[bytes] = pexpect.spawn(
        command[0], list(command[1:]), cwd=str(directory), env=dict(env), echo=False,
        timeout=None, preexec_fn=preexec)
    os.set_blocking(int(process.child_fd), False)
    return process
