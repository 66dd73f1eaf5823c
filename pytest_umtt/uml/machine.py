"""UML machines in virtual time: boot, console, command channel, crashes and teardown.

A :class:`Machine` is one UML kernel on a :class:`~pytest_umtt.simulation.Simulation`'s
clock. Its init is the guest agent (agent.sh): commands go through files in the
machine directory and come back with a doorbell, always while the simulation is paused,
so results never depend on host speed (DESIGN.md facts 5-8).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import hashlib
import os
import re
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pexpect
import psutil

from ..devices import VirtioDevice
from ..devices.console import VirtioConsole
from ..errors import (
    NS_PER_S,
    CommandTimeout,
    DeviceError,
    ExpectTimeout,
    MachineCrashed,
    MachineError,
    format_ns,
)
from .agent import (
    BOOT_SCRIPT,
    COMMANDS_DIR,
    POWEROFF_COMMAND,
    Bell,
    CommandChannel,
    decode,
    install,
    read_without_links,
)
from .confine import confine_to
from .console import Console
from .splats import Splat

if TYPE_CHECKING:
    from ..controller import Calendar, Client, Stop

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


def fix_uml_process(parent: int, confine: Path | None = None) -> None:
    """Between fork and exec of UML: die with the test process (even if it is SIGKILLed;
    UML's own helpers already die with UML), console output that stays blocking
    (:func:`separate_console_output`), fixed resource limits (UML prints the core-dump
    limits on its console), and, given a directory, confinement to it
    (:mod:`pytest_umtt.uml.confine`). ``parent`` is the test process's pid, taken before the
    fork."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    separate_console_output()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    soft = UML_STACK_LIMIT if hard == resource.RLIM_INFINITY else min(UML_STACK_LIMIT, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))
    if confine is not None:
        confine_to(confine)


NO_ASLR = ("setarch", "-R")
"""Prefix that starts UML without host address-space randomisation. UML sizes its physical
memory around the host's layout ("exec-shield gap"), so with ASLR every boot gets another
memory map and runs with one seed differ. (setarch execs UML: the kernel's own command
line is unchanged.)"""


def _check_timeout(timeout: float | None) -> None:
    # GNU timeout reads 0 as "no limit": anything that prints as 0.000000000 would be one.
    if timeout is not None and not 1e-9 <= timeout <= MAX_COMMAND_TIMEOUT:
        raise ValueError(f"timeout must be a number of virtual seconds from 1e-9 to "
                         f"{MAX_COMMAND_TIMEOUT:g}, got {timeout!r}")


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


AGENT_CHANNEL_ENV = "UMTT_AGENT_CHANNEL"
AGENT_LINE = re.compile(rb"(?:R|D (?P<done>\d{1,9}) (?P<status>\d{1,3}))$")
"""What the agent writes, at the end of a line: a half line a command left on hvc0 may
come before it."""
MAX_AGENT_LINE = 64


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
        raise RuntimeError(f"processes survived SIGKILL: {[p.pid for p in alive]}")
    return [p.pid for p in procs]


# --- the machine ----------------------------------------------------------------------

DEFAULT_IDLE_MAX = 0.1
DEFAULT_COMMAND_TIMEOUT = 24 * 3600.0
"""Virtual seconds a command may take when the caller gives no timeout."""
MAX_COMMAND_TIMEOUT = 1e9
"""About 31 years of virtual time: its nanoseconds still fit the protocol's s64."""
POWEROFF_WALL_TIMEOUT = 2.0
REBOOT_MARK = b"reboot: Restarting system"
MAX_HELD_CONSOLE = 1 << 20
"""Bytes of console output held for a timestamp before they get the run's start time."""


def seconds_to_ns(seconds: float) -> int:
    return round(seconds * NS_PER_S)


class MachineState(enum.Enum):
    """Where a machine is in its life."""

    CREATED = "created"
    BOOTING = "booting"
    READY = "ready"
    CRASHED = "crashed"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class CommandResult:
    """What a command did: exit status, output (byte-exact) and its virtual start and end
    times on the simulation's clock (``started``/``ended`` in seconds, ``*_ns`` exact),
    as the host saw them (so a guest that sets its own clock does not change them)."""

    command: str
    status: int
    stdout: bytes
    stderr: bytes
    started_ns: int
    ended_ns: int

    @property
    def started(self) -> float:
        """Virtual time it started, in seconds."""
        return self.started_ns / NS_PER_S

    @property
    def ended(self) -> float:
        """Virtual time it ended, in seconds."""
        return self.ended_ns / NS_PER_S

    @property
    def duration(self) -> float:
        """Virtual seconds the command took."""
        return (self.ended_ns - self.started_ns) / NS_PER_S

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def output(self) -> str:
        """stdout as text."""
        return self.stdout.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"<CommandResult {self.command!r} status={self.status} "
                f"{format_ns(self.started_ns)}..{format_ns(self.ended_ns)}>")


@dataclass(frozen=True, slots=True)
class ConsoleMatch:
    """A pattern found on the console, and the virtual time its line was seen (``time``
    in seconds, ``time_ns`` exact)."""

    match: re.Match[str]
    time_ns: int

    @property
    def time(self) -> float:
        return self.time_ns / NS_PER_S

    def group(self, index: int | str = 0) -> str:
        return self.match.group(index)


class BackgroundCommand:
    """A command started with :meth:`Machine.start`; :meth:`wait` for its result."""

    def __init__(self, machine: Machine, number: int, command: str, started_ns: int) -> None:
        self.machine = machine
        self.number = number
        self.command = command
        self.started_ns = started_ns

    @property
    def started(self) -> float:
        """Virtual time it started, in seconds."""
        return self.started_ns / NS_PER_S

    @property
    def done(self) -> bool:
        return self.number in self.machine._finished

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Run the simulation until the command ends (at most ``timeout`` virtual seconds)."""
        return self.machine._await_result(self.number, self.command, timeout)


class MachineHost(Protocol):
    """What a machine needs from the simulation it runs in (a
    :class:`~pytest_umtt.simulation.Simulation`): its clock and calendar, where machines
    live, what seeds their entropy, and the budgets its waits go by. A machine never
    imports the simulation; the simulation routes the calendar's events to machines."""

    directory: Path
    calendar: Calendar
    seed: int
    shim: Path | None
    confined: bool
    time_travel_start_ns: int
    wall_timeout: float

    @property
    def now_ns(self) -> int: ...

    def bind_path(self, name: str) -> str:
        """Where to bind a socket named ``name`` in the simulation's directory (a path
        that fits a socket address however deep the directory is)."""
        ...

    def watched_closely(self, wall_timeout: float | None = None
                        ) -> AbstractContextManager[None]: ...

    def run_until(self, condition: Callable[[], bool] | None = None, *,
                  deadline_ns: int | None = None, machines: Iterable[Machine] = ()) -> Stop: ...


class Machine:
    """One UML kernel on the simulation's clock, with a guest agent to run commands."""

    def __init__(self, sim: MachineHost, name: str, client_id: int, *, kernel: Path,
                 mem: str = DEFAULT_MEM, cmdline: Sequence[str] = (),
                 idle_max: float = DEFAULT_IDLE_MAX, agent: Path | None = None,
                 default_timeout: float = DEFAULT_COMMAND_TIMEOUT, rootfs: bool = False,
                 devices: Sequence[VirtioDevice] = (), agent_console: bool = False,
                 modules: Path | None = None) -> None:
        self.sim = sim
        self.modules = modules
        """The kernel's installed modules (the directory holding ``RELEASE/``), which the
        guest sees at /lib/modules; None: the kernel has none."""
        self.devices = list(devices)
        self.agent_console: VirtioConsole | None = None
        """The agent's command channel when the kernel has virtio-console (the agent
        then blocks on /dev/hvc0 and idles for free); None: the agent polls files."""
        if agent_console and agent is None:
            self.agent_console = VirtioConsole("agent", on_receive=self._on_agent_output)
            self.devices.insert(0, self.agent_console)  # the first console: /dev/hvc0
        self.name = name
        self.client_id = client_id
        self.kernel = kernel
        self.mem = mem
        self.cmdline = list(cmdline)
        self.idle_max = idle_max
        self.agent = agent
        self.default_timeout = default_timeout
        self.rootfs = rootfs
        self.directory = sim.directory / name
        self.state = MachineState.CREATED
        self.client: Client | None = None
        self.process: pexpect.spawn[bytes] | None = None
        self.console: Console | None = None
        self.doorbells: list[tuple[int, int]] = []
        """(time_ns, value) of every doorbell the guest rang."""
        self.results: list[CommandResult] = []
        self.ready_ns: int | None = None
        """When the guest agent was first ready: console lines after it are the test's."""
        self.error: MachineError | None = None
        self._next_command = 1
        self._finished: dict[int, int] = {}
        self._started: dict[int, int] = {}
        self._background: set[int] = set()
        self._submitted: dict[int, int] = {}
        self._statuses: dict[int, int] = {}
        self._agent_output = bytearray()
        self._last_loop_ring = 0
        self._expect_from = 0
        self._pty_fd = -1
        self._powering_off = False
        self._channel: CommandChannel | None = None
        self._pidfd = -1
        self._console_tail_bytes = b""

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.state.value}>"

    # --- boot ---------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the kernel process; the simulation then serves its START."""
        self.directory.mkdir(mode=0o700)
        self._channel = install(self.directory, self.agent, self.modules)
        # Beside the machine's directory, not in it: the guest can replace what is in it.
        self.console = Console(self.sim.directory / f"{self.name}.console.log", self.name)
        extra = [f"UMTT_HOSTNAME={self.name}",
                 f"UMTT_IDLE_MAX_US={seconds_to_ns(self.idle_max) // 1000}",
                 *([f"{AGENT_CHANNEL_ENV}=console"] if self.agent_console else []),
                 *self._serve_devices(), *self.cmdline]
        # The guest's clock reads the simulation's: a machine booted at virtual time T
        # starts its wall clock T after the others did.
        start_ns = self.sim.time_travel_start_ns + self.sim.now_ns
        command = uml_command(self.kernel, client_id=self.client_id, mem=self.mem, extra=extra,
                              time_travel_start_ns=start_ns, rootfs=self.rootfs)
        env = uml_environment(self.sim.shim, derive_seed(self.sim.seed, self.name))
        self.process = pexpect.spawn(command[0], command[1:], cwd=str(self.directory),
                                     env=env, echo=False, timeout=None,
                                     preexec_fn=functools.partial(
                                         fix_uml_process, os.getpid(),
                                         self.directory if self.sim.confined else None))
        self._pty_fd = int(self.process.child_fd)
        os.set_blocking(self._pty_fd, False)
        self.sim.calendar.add_reader(self._pty_fd, self._read_console)
        # Readable when the kernel's process ends: an exit at boot is seen at once.
        assert self.process.pid is not None
        self._pidfd = os.pidfd_open(self.process.pid)
        self.sim.calendar.add_reader(self._pidfd, self._on_process_exit)
        self.state = MachineState.BOOTING

    def _serve_devices(self) -> list[str]:
        """Listen for the kernel on each device's socket, beside the machine's directory
        (the guest can change what is in it); the kernel arguments that attach them."""
        arguments = []
        for device in self.devices:
            socket_name = f"{self.name}-{device.name}.sock"
            label = f"{self.name}/{device.name}"
            backend = device.serve(self.sim.calendar, self.sim.bind_path(socket_name),
                                   derive_seed(self.sim.seed, label), label)
            backend.on_failure.append(self._device_failed)
            arguments.append(f"virtio_uml.device=../{socket_name}:{device.device_id}")
        return arguments

    def _device_failed(self, error: DeviceError) -> None:
        """A device failed on what the kernel sent it: the machine cannot go on."""
        self.crashed(f"device {error.device} failed on {error.request}: {error.detail}")

    def _on_process_exit(self) -> None:
        self.sim.calendar.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1

    @property
    def channel(self) -> CommandChannel:
        """The command files' host side (there once the machine is spawned)."""
        if self._channel is None:
            raise MachineError(self.name, "the machine was never started", self.sim.now_ns)
        return self._channel

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.isalive()

    # --- console --------------------------------------------------------------------

    def _read_console(self) -> None:
        """Called by the calendar whenever the pty has data."""
        assert self.console is not None
        data = self._drain_pty()
        if data is None:
            return
        if REBOOT_MARK in self._console_tail_bytes + data:
            # UML re-executes itself to reboot: it would neither WAIT nor leave. Stop it.
            self.console.hold(data)
            self.console.stamp(self.sim.calendar.now)
            self.crashed("the guest rebooted")
            return
        self._console_tail_bytes = data[-len(REBOOT_MARK):]
        if self.client is not None and self.client is self.sim.calendar.runner:
            self.console.hold(data)
            if self.console.held_bytes > MAX_HELD_CONSOLE:
                # A flood: stamp it with the start of the run that printed it.
                self.console.stamp(self.sim.calendar.now)
        else:
            self.console.feed(data, self.sim.calendar.now)

    def _drain_pty(self) -> bytes | None:
        chunks = []
        while True:
            try:
                chunk = os.read(self._pty_fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.EIO:
                    raise
                chunk = b""
            if not chunk:  # the kernel closed its console: it exited
                self.sim.calendar.remove_reader(self._pty_fd)
                break
            chunks.append(chunk)
        return b"".join(chunks) if chunks else None

    def on_wait(self) -> None:
        """The kernel sent WAIT: all it printed is in the pty; stamp it with now."""
        self._catch_up_console()

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> ConsoleMatch:
        """Run the simulation until the console shows ``pattern`` (after the previous
        match), for at most ``timeout`` virtual seconds: exactly, not later."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        console = self.console
        assert console is not None
        found: list[tuple[int, re.Match[str]]] = []
        # Where to look again: a pattern that spans no line ends can only match in
        # lines that were not complete at the previous look.
        single_line = "\\n" not in regex.pattern and "\n" not in regex.pattern \
            and not regex.flags & re.DOTALL
        resume = self._expect_from

        def seen() -> bool:
            nonlocal resume
            span = console.search(regex, resume)
            if span is not None:
                found.append(span)
            elif single_line:
                resume = max(resume, console.end_of_lines)
            return span is not None

        # Bound free runs while waiting, so the match's time is exact to the resolution.
        with self.sim.watched_closely():
            self.sim.run_until(seen, deadline_ns=self.sim.now_ns + seconds_to_ns(timeout),
                               machines=(self,))
        if not found:
            raise ExpectTimeout(self.name, f"{regex.pattern!r} did not appear on the console "
                                f"within {timeout} s of virtual time", self.sim.now_ns,
                                console.tail(), str(console.log_path))
        base, match = found[0]
        self._expect_from = base + match.end()
        return ConsoleMatch(match, console.time_at(base + match.start()))

    # --- commands -------------------------------------------------------------------

    def run(self, command: str, *, timeout: float | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            check: bool = False) -> CommandResult:
        """Run ``command`` with /bin/sh semantics in the guest and wait for it: exit
        status, stdout and stderr apart (byte-exact), virtual start and end times.
        ``timeout`` is in virtual seconds; the guest kills the command at that instant.
        Without one, the command may take ``default_timeout`` before this raises."""
        number = self._submit(command, env, cwd, timeout, background=False)
        # The guest kills the command at ``timeout``; the host allows a second more.
        result = self._await_result(number, command, None if timeout is None else timeout + 1,
                                    foreground=True)
        if check and not result.ok:
            raise MachineError(self.name, f"command {command!r} exited with {result.status}; "
                               f"stderr: {result.stderr.decode(errors='replace')[-2000:]}",
                               self.sim.now_ns)
        return result

    def start(self, command: str, *, timeout: float | None = None,
              env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> BackgroundCommand:
        """Start ``command`` in the background; returns once the guest has started it."""
        number = self._submit(command, env, cwd, timeout, background=True)
        self.sim.run_until(lambda: number in self._started or number in self._finished,
                           machines=(self,))
        self._raise_if_down()
        started = self._started.get(number, self._finished.get(number, self.sim.now_ns))
        return BackgroundCommand(self, number, command, started)

    def _submit(self, command: str, env: Mapping[str, str] | None, cwd: str | None,
                timeout: float | None, *, background: bool) -> int:
        self._raise_if_down()
        _check_timeout(timeout)
        number = self._next_command
        self._next_command += 1
        files = {"command": (command + "\n").encode()}
        if env:
            files["env"] = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
        if cwd is not None:
            files["cwd"] = cwd.encode()
        if timeout is not None:
            files["timeout"] = f"{timeout:.9f}".encode()
        if background:
            files["background"] = b""
            self._background.add(number)
        self._submitted[number] = self.sim.now_ns
        try:
            self.channel.submit(number, files, go=self.agent_console is None)
        except OSError as exc:
            raise MachineError(self.name, f"cannot hand command {number} to the guest: the "
                               f"guest changed its command directory ({exc})",
                               self.sim.now_ns) from None
        if self.agent_console is not None:
            # The guest reads it at this very instant: that is when the command starts.
            self._started[number] = self.sim.now_ns
            self.agent_console.send(f"{number}\n".encode())
        return number

    def _await_result(self, number: int, command: str, timeout: float | None, *,
                      foreground: bool = False) -> CommandResult:
        budget = self.default_timeout if timeout is None else timeout
        self.sim.run_until(lambda: number in self._finished,
                           deadline_ns=self.sim.now_ns + seconds_to_ns(budget), machines=(self,))
        if number not in self._finished:
            self._raise_if_down()
            what = f"command {command!r} did not finish within {budget} s of virtual time"
            tail = self.console_tail()
            if foreground:
                # Still running, it would hold up every later command: stop the machine.
                self.crashed(f"stopped after command {command!r} outlived its budget of "
                             f"{budget} s (virtual)")
                what += "; the machine was stopped (later calls on it raise)"
            raise CommandTimeout(self.name, what, self.sim.now_ns, tail, self.console_log())
        return self._read_result(number, command)

    def _read_result(self, number: int, command: str) -> CommandResult:
        try:
            stdout, stderr = (self.channel.read(number, name) for name in ("stdout", "stderr"))
            status = self._statuses.pop(number, None)
            if status is None:
                status = int(self.channel.read(number, "result").split()[0])
        except (OSError, ValueError, IndexError) as exc:
            raise MachineError(self.name, f"the result of command {command!r} is unreadable: "
                               f"the guest removed or replaced /mnt/cmd/{number} ({exc})",
                               self.sim.now_ns, self.console_tail(), self.console_log()) from None
        result = CommandResult(command, status, stdout, stderr,
                               self._started[number], self._finished[number])
        self.results.append(result)
        return result

    # --- files ----------------------------------------------------------------------

    def push(self, source: str | os.PathLike[str], name: str | None = None) -> str:
        """Copy a host file or directory (a test's ``tmp_path``, a binary) into the
        machine's directory; returns the path where the guest sees it (``/mnt/NAME``)."""
        source = Path(source)
        name = name or source.name
        if not name or "/" in name or name in (".", "..", COMMANDS_DIR):
            raise ValueError(f"{self.name}: {name!r} is not a plain file name for /mnt")
        target = self.directory / name
        if os.path.lexists(target):
            raise MachineError(self.name, f"/mnt/{name} exists already in the guest",
                               self.sim.now_ns)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target)
        return f"{GUEST_MOUNT}/{name}"

    def pull(self, guest_path: str) -> bytes:
        """The bytes of a file the guest wrote under /mnt; links are never followed."""
        parts = Path(guest_path).relative_to(GUEST_MOUNT).parts
        if not parts or ".." in parts:
            raise ValueError(f"{self.name}: {guest_path!r} is not a file under {GUEST_MOUNT}")
        try:
            top = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                return read_without_links(top, parts)
            finally:
                os.close(top)
        except OSError as exc:
            raise MachineError(self.name, f"cannot read {guest_path} ({exc.strerror}; a link "
                               f"or a missing file)", self.sim.now_ns) from None

    # --- doorbells and departures ------------------------------------------------------

    def on_doorbell(self, value: int) -> None:
        """The guest rang: the agent is ready, a command started or ended.

        The agent's main loop rings when it is ready, when it starts a command after
        having idled, and when a command it ran in the foreground ends; a foreground
        command that it did not ring for started at the loop's previous ring (it looked
        for the command right after that ring, at the same instant)."""
        kind, number = decode(value)
        now = self.sim.calendar.now
        self.doorbells.append((now, value))
        if kind == Bell.READY and self.state is MachineState.BOOTING:
            self.state = MachineState.READY
            self.ready_ns = now
        elif kind == Bell.DONE:
            self._finished[number] = now
            if number in self._background:
                return
            self._started.setdefault(number, max(self._last_loop_ring,
                                                 self._submitted.get(number, 0)))
        elif kind == Bell.STARTED:
            self._started[number] = now
        self._last_loop_ring = now

    def _on_agent_output(self, data: bytes) -> None:
        """Lines the agent wrote to /dev/hvc0, at the instant it wrote them: ``R``
        (ready) and ``D N STATUS`` (command N ended). A guest command can write there
        too: lines that name no command in flight are ignored (a command that forges
        the line of another one in flight can end it early, as a guest root can)."""
        self._agent_output += data
        *lines, rest = self._agent_output.split(b"\n")
        self._agent_output = bytearray(rest[-MAX_AGENT_LINE:])
        now = self.sim.calendar.now
        if lines and self.agent_console is not None and self.agent_console.backend:
            # A wait may end at this instant: the kernel must not run on past it.
            self.sim.calendar.recall_runner(self.agent_console.backend.defer_reply())
        for line in lines:
            match = AGENT_LINE.search(line.rstrip(b"\r"))
            if match is None:
                continue
            if match["done"] is None:
                if self.state is MachineState.BOOTING:
                    self.state = MachineState.READY
                    self.ready_ns = now
                continue
            number = int(match["done"])
            if number in self._submitted and number not in self._finished:
                self._finished[number] = now
                self._statuses[number] = int(match["status"])

    def on_disconnect(self) -> None:
        """The kernel left the calendar: powered off, or died."""
        if self.state in (MachineState.OFF, MachineState.CRASHED):
            return
        if self._powering_off:
            self.state = MachineState.OFF
            return
        self.crashed("the kernel left the calendar (its process ended)")

    def crash_cause(self) -> str | None:
        """Why the console says the kernel crashed, if it does."""
        if self.console is None or self.console.crash is None:
            return None
        cause, line = self.console.crash
        return f"{cause}: {line.text.strip()} (seen at {format_ns(line.time_ns)})"

    def crashed(self, cause: str) -> MachineCrashed:
        """Mark the machine crashed, end its processes, and remember why."""
        if self.error is None:
            self._catch_up_console()
            console_cause = self.crash_cause()
            self.state = MachineState.CRASHED
            self.kill()
            self.error = MachineCrashed(self.name, console_cause or cause, self.sim.now_ns,
                                        self.console_tail(), self.console_log())
        return self._remembered_crash()

    def stalled(self, error: MachineError) -> None:
        """The calendar gave up waiting for this machine: end it, and remember why."""
        self.kill()
        self.state = MachineState.CRASHED
        self.error = error

    def _remembered_crash(self) -> MachineCrashed:
        """A fresh exception carrying the first failure, for every later call to raise."""
        assert self.error is not None
        return MachineCrashed(self.name, self.error.what, self.error.now_ns,
                              self.error.console_tail, self.error.log)

    def _raise_if_down(self) -> None:
        if self.error is not None:
            raise self._remembered_crash()
        if self.state is not MachineState.READY:
            raise MachineError(self.name, f"the machine is {self.state.value}, not ready",
                               self.sim.now_ns, self.console_tail(), self.console_log())

    def console_tail(self, count: int = 25) -> str:
        if self.console is None:
            return ""
        self._catch_up_console()
        return self.console.tail(count)

    def console_log(self) -> str | None:
        return None if self.console is None else str(self.console.log_path)

    @property
    def splats(self) -> list[Splat]:
        """Reports the kernel printed and survived (a WARNING, KASAN, lockdep...) up to
        now, oldest first, each with its lines, virtual times and signature."""
        if self.console is None:
            return []
        self._catch_up_console()
        return self.console.splats

    def _catch_up_console(self) -> None:
        """Read what is still in the pty and give everything held the present time."""
        if self.console is not None and self._pty_fd >= 0:
            data = self._drain_pty()
            if data:
                self.console.hold(data)
            self.console.stamp(self.sim.calendar.now)

    # --- teardown -------------------------------------------------------------------

    def poweroff(self, timeout: float = 5.0, wall_timeout: float = POWEROFF_WALL_TIMEOUT) -> None:
        """Power off through the agent and wait (virtual ``timeout``, at most
        ``wall_timeout`` wall seconds of stalled time) for the kernel to go."""
        if self.state is not MachineState.READY:
            return
        self._powering_off = True
        self._submit(POWEROFF_COMMAND, None, None, None, background=True)
        # A guest that polls the clock moves virtual time 100-180x slower than real time:
        # bound the wait in wall time too, and let no free run hide the clock from it.
        give_up = time.monotonic() + wall_timeout
        with self.sim.watched_closely(wall_timeout=wall_timeout):
            self.sim.run_until(lambda: (self.state is not MachineState.READY
                                        or time.monotonic() > give_up),
                               deadline_ns=self.sim.now_ns + seconds_to_ns(timeout))

    def kill(self) -> None:
        """End the whole UML process tree now."""
        if self.process is not None and self.process.pid is not None:
            kill_process_tree(self.process.pid, reap_root=False)
            self.process.wait()

    def close(self, keep_directory: bool = False, polite: bool = True) -> None:
        """Power off politely if possible, then make sure nothing of the machine remains."""
        try:
            if polite and self.alive and self.state is MachineState.READY:
                self.poweroff()
        except MachineError:
            pass  # the kill below ends it either way; the error stays in self.error
        finally:
            self._release(keep_directory)

    def _release(self, keep_directory: bool) -> None:
        self.kill()
        self._catch_up_console()
        if self._pty_fd >= 0:
            self.sim.calendar.remove_reader(self._pty_fd)
            self._pty_fd = -1
        if self._pidfd >= 0:
            self._on_process_exit()
        if self.process is not None:
            self.process.close(force=True)
        if self.console is not None:
            self.console.close()
        if self._channel is not None:
            self._channel.close()
        for device in self.devices:
            device.close()
        if self.state is not MachineState.CRASHED:
            self.state = MachineState.OFF
        if not keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            if self.console is not None:
                self.console.log_path.unlink(missing_ok=True)

