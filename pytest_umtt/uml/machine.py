"""UML machines in virtual time: boot, console, commands, crashes and teardown.

A :class:`Machine` is one UML kernel on a :class:`~pytest_umtt.simulation.Simulation`'s
clock, started by :mod:`.launch`, its console read by :mod:`.console`. Its init is the
guest agent (agent.sh); its commands go through a command channel (:mod:`.channel`:
virtio-console or polled files), always while the simulation is paused, so results never
depend on host speed (DESIGN.md facts 5-8). Each command is a
:class:`~.channel.CommandRecord`; a finished one becomes a :class:`CommandResult`.
"""

from __future__ import annotations

import enum
import errno
import os
import re
import select
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pexpect

from ..devices import VirtioDevice
from ..devices.console import VirtioConsole
from ..errors import (
    NS_PER_S,
    CommandTimeout,
    DeviceError,
    ExpectTimeout,
    KillError,
    MachineCrashed,
    MachineError,
    format_ns,
)
from ..placement import Placement
from ..units import MAX_SECONDS, seconds_to_ns
from .agent import COMMANDS_DIR, POWEROFF_COMMAND, install, read_without_links
from .channel import CommandChannel, CommandRecord
from .channel_console import ConsoleChannel
from .channel_files import FilesChannel
from .console import Console
from .launch import DEFAULT_MEM as DEFAULT_MEM  # noqa: PLC0414 (the plugin's default too)
from .launch import (
    GCOV_ENVIRONMENT,
    GUEST_MOUNT,
    derive_seed,
    kill_process_tree,
    spawn_uml,
    uml_command,
    uml_environment,
    wait_for_exit,
)
from .splats import Splat

if TYPE_CHECKING:
    from ..controller import Calendar, Client

# --- the machine ----------------------------------------------------------------------

DEFAULT_IDLE_MAX = 0.1
DEFAULT_COMMAND_TIMEOUT = 24 * 3600.0
"""Virtual seconds a command may take when the caller gives no timeout."""
MAX_COMMAND_TIMEOUT = MAX_SECONDS
POWEROFF_WALL_TIMEOUT = 2.0
KILL_GRACE_NS = NS_PER_S
"""Virtual time a command killed at its budget has to end before its machine is stopped."""
KILLED_STATUS = 128 + 9
"""A command's exit status when SIGKILL ended it (the shell's way of saying so)."""
REBOOT_MARKS = (b"reboot: Restarting system", b"sysrq: Resetting")
"""What the kernel prints before UML re-executes itself to reboot: reboot(2)'s line
(kernel/reboot.c), or a sysrq reset's, which prints only its action (drivers/tty/sysrq.c)."""
REBOOT_MARK_MAX = max(map(len, REBOOT_MARKS))
COVERAGE_EXIT_WALL_TIMEOUT = 60.0
"""Wall seconds a coverage kernel may take from its halt to its exit: libgcov writes a
file per object file then (~3,000)."""
MAX_HELD_CONSOLE = 1 << 20
"""Bytes of console output held for a timestamp before they get the run's start time."""


def command_files(command: str, env: Mapping[str, str] | None, cwd: str | None,
                  timeout: float | None, background: bool) -> dict[str, bytes]:
    """The files of a command's directory (``cmd/N/``) that tell the agent what to run."""
    files = {"command": (command + "\n").encode()}
    if env:
        files["env"] = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    if cwd is not None:
        files["cwd"] = cwd.encode()
    if timeout is not None:
        files["timeout"] = f"{timeout:.9f}".encode()
    if background:
        files["background"] = b""
    return files


def _check_timeout(timeout: float | None) -> None:
    # GNU timeout reads 0 as "no limit": anything that prints as 0.000000000 would be one.
    if timeout is not None and not 1e-9 <= timeout <= MAX_COMMAND_TIMEOUT:
        raise ValueError(f"timeout must be a number of virtual seconds from 1e-9 to "
                         f"{MAX_COMMAND_TIMEOUT:g}, got {timeout!r}")


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

    def __init__(self, machine: Machine, record: CommandRecord, started_ns: int) -> None:
        self.machine = machine
        self.record = record
        self.number = record.number
        self.command = record.command
        self.started_ns = started_ns

    @property
    def started(self) -> float:
        """Virtual time it started, in seconds."""
        return self.started_ns / NS_PER_S

    @property
    def done(self) -> bool:
        return self.record.finished

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Run the simulation until the command ends (at most ``timeout`` virtual seconds)."""
        return self.machine._await_background(self.record, timeout)


class CountsSink(Protocol):
    """Where a coverage kernel's counts go as its machine closes
    (:class:`pytest_umtt.coverage.CoverageSink`)."""

    @property
    def missed(self) -> list[str]:
        """Machines that left no counts, and why."""
        ...

    def harvest(self, machine: str, machine_dir: Path) -> int:
        """Take the counts the kernel wrote at exit into ``machine_dir``."""
        ...


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
    placement: Placement
    time_travel_start_ns: int
    wall_timeout: float

    @property
    def coverage(self) -> CountsSink | None:
        """Where a coverage kernel's counts go as each machine closes (None: not
        gathered)."""
        ...

    @property
    def now_ns(self) -> int: ...

    def bind_path(self, name: str) -> str:
        """Where to bind a socket named ``name`` in the simulation's directory (a path
        that fits a socket address however deep the directory is)."""
        ...

    def watched_closely(self, wall_timeout: float | None = None
                        ) -> AbstractContextManager[None]: ...

    def run_until(self, condition: Callable[[], bool] | None = None, *,
                  deadline_ns: int | None = None, machines: Iterable[Machine] = ()) -> object: ...


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
        self.channel: CommandChannel = (
            ConsoleChannel(self, sim.calendar) if agent_console and agent is None
            else FilesChannel(self, sim.calendar))
        """How commands reach the agent: virtio-console when the kernel has it (the agent
        then blocks on /dev/hvc0 and idles for free), else polled files."""
        self.devices = [*self.channel.devices, *devices]
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
        self._commands: dict[int, CommandRecord] = {}
        self._expect_from = 0
        self._pty_fd = -1
        self._pty_poll = select.poll()
        self._powering_off = False
        self._pidfd = -1
        self._console_tail_bytes = b""

    def __repr__(self) -> str:
        return f"<Machine {self.name} {self.state.value}>"

    @property
    def agent_console(self) -> VirtioConsole | None:
        """The agent's virtio console (/dev/hvc0), if that is its channel."""
        return self.channel.device if isinstance(self.channel, ConsoleChannel) else None

    # --- boot ---------------------------------------------------------------------

    def spawn(self) -> None:
        """Start the kernel process; the simulation then serves its START."""
        self.directory.mkdir(mode=0o700)
        self.channel.open(install(self.directory, self.agent, self.modules))
        # Beside the machine's directory, not in it: the guest can replace what is in it.
        self.console = Console(self.sim.directory / f"{self.name}.console.log", self.name)
        extra = [f"UMTT_HOSTNAME={self.name}",
                 f"UMTT_IDLE_MAX_US={seconds_to_ns(self.idle_max) // 1000}",
                 *self.channel.kernel_arguments(),
                 *self._serve_devices(), *self.cmdline]
        # The guest's clock reads the simulation's: a machine booted at virtual time T
        # starts its wall clock T after the others did.
        start_ns = self.sim.time_travel_start_ns + self.sim.now_ns
        command = uml_command(self.kernel, client_id=self.client_id, mem=self.mem, extra=extra,
                              time_travel_start_ns=start_ns, rootfs=self.rootfs)
        env = uml_environment(self.sim.shim, derive_seed(self.sim.seed, self.name))
        if self.sim.coverage is not None:
            env.update(GCOV_ENVIRONMENT)
        self.process = spawn_uml(command, self.directory, env, confined=self.sim.confined,
                                 cpu=self.sim.placement.cpu)
        self._pty_fd = int(self.process.child_fd)
        self._pty_poll.register(self._pty_fd, select.POLLIN)
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
    def alive(self) -> bool:
        return self.process is not None and self.process.isalive()

    # --- console --------------------------------------------------------------------

    def _read_console(self) -> None:
        """Called by the calendar whenever the pty has data."""
        assert self.console is not None
        data = self._drain_pty()
        if data is None:
            return
        window = self._console_tail_bytes + data
        if any(mark in window for mark in REBOOT_MARKS):
            # UML re-executes itself to reboot: it would neither WAIT nor leave. Stop it.
            self.console.hold(data)
            self.console.stamp(self.sim.calendar.now)
            self.crashed("the guest rebooted")
            return
        self._console_tail_bytes = window[-REBOOT_MARK_MAX:]
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
        """The kernel sent WAIT: all it printed is in the pty; stamp it with now (the
        clock's: nobody runs, so nothing newer is published)."""
        self._catch_up_console(self.sim.calendar.clock.now)

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

        ``timeout`` (virtual seconds; ``default_timeout`` without one) is the command's
        budget. As with ``subprocess.run(timeout=)``, a command that outlives it is
        killed at that instant, with its process group in the guest, and
        :class:`CommandTimeout` carries what it had written; the machine runs the next
        command."""
        _check_timeout(timeout)
        budget = self.default_timeout if timeout is None else timeout
        record = self._submit(command, env, cwd, None, background=False, budget=budget,
                              budget_given=timeout is not None)
        result = self._await_foreground(record)
        if check and not result.ok:
            raise MachineError(self.name, f"command {command!r} exited with {result.status}; "
                               f"stderr: {result.stderr.decode(errors='replace')[-2000:]}",
                               self.sim.now_ns)
        return result

    def start(self, command: str, *, timeout: float | None = None,
              env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> BackgroundCommand:
        """Start ``command`` in the background; returns once the guest has started it."""
        record = self._submit(command, env, cwd, timeout, background=True)
        self.sim.run_until(lambda: record.started_ns is not None or record.finished,
                           machines=(self,))
        self._raise_if_down()
        started = record.started_ns
        if started is None:
            started = self.sim.now_ns if record.ended_ns is None else record.ended_ns
        return BackgroundCommand(self, record, started)

    def command(self, number: int) -> CommandRecord | None:
        """The command numbered ``number`` (for the channel: numbers come from the guest)."""
        return self._commands.get(number)

    def agent_ready(self) -> None:
        """The channel heard the agent say it is ready."""
        if self.state is MachineState.BOOTING:
            self.state = MachineState.READY
            self.ready_ns = self.sim.calendar.now

    def _submit(self, command: str, env: Mapping[str, str] | None, cwd: str | None,
                timeout: float | None, *, background: bool, budget: float | None = None,
                budget_given: bool = False) -> CommandRecord:
        """Hand a command to the guest: ``timeout`` is the guest's own (timeout(1), for a
        background command), ``budget`` the host's (for a foreground command)."""
        self._raise_if_down()
        _check_timeout(timeout)
        record = CommandRecord(len(self._commands) + 1, command, self.sim.now_ns, background,
                               budget_ns=None if budget is None else seconds_to_ns(budget),
                               budget_given=budget_given)
        self._commands[record.number] = record
        try:
            self.channel.submit(record, command_files(command, env, cwd, timeout, background))
        except OSError as exc:
            raise MachineError(self.name, f"cannot hand command {record.number} to the guest: "
                               f"the guest changed its command directory ({exc})",
                               self.sim.now_ns) from None
        return record

    def _await_foreground(self, record: CommandRecord) -> CommandResult:
        """Wait for a foreground command; at its budget, have it killed."""
        assert record.budget_ns is not None
        self._wait_for(record, record.submitted_ns + record.budget_ns)
        if not record.finished and self.channel.kill(record):
            record.killed_ns = self.sim.now_ns
        if not record.finished and (record.killed_ns is not None or record.guest_kills):
            # Over the console the agent answers at once; over files it kills the
            # command at its budget, which began when it started: allow a second more.
            self._wait_for(record, self.sim.now_ns + KILL_GRACE_NS)
        if not record.finished:
            raise self._unresponsive(record)
        result = self._read_result(record)
        if record.killed_ns is not None or (result.status == KILLED_STATUS
                                            and result.ended_ns - result.started_ns
                                            >= record.budget_ns):
            raise self._timed_out(record, result)
        return result

    def _await_background(self, record: CommandRecord, timeout: float | None) -> CommandResult:
        budget = self.default_timeout if timeout is None else timeout
        self._wait_for(record, self.sim.now_ns + seconds_to_ns(budget))
        if not record.finished:
            self._raise_if_down()
            raise CommandTimeout(self.name, f"command {record.command!r} did not finish within "
                                 f"{budget} s of virtual time", self.sim.now_ns,
                                 self.console_tail(), self.console_log(),
                                 command=record.command, timeout_ns=seconds_to_ns(budget))
        return self._read_result(record)

    def _wait_for(self, record: CommandRecord, deadline_ns: int) -> None:
        self.sim.run_until(lambda: record.finished, deadline_ns=deadline_ns, machines=(self,))

    def _timed_out(self, record: CommandRecord, result: CommandResult) -> CommandTimeout:
        """The error for a command killed at its budget (the machine goes on)."""
        assert record.budget_ns is not None
        killed = record.killed_ns if record.killed_ns is not None else result.ended_ns
        return CommandTimeout(
            self.name, f"command {record.command!r} did not finish within "
            f"{record.budget_ns / NS_PER_S:g} s of virtual time: killed with its process group "
            f"at {format_ns(killed)} (the machine runs the next command)", killed,
            self.console_tail(), self.console_log(), command=record.command,
            timeout_ns=record.budget_ns, stdout=result.stdout, stderr=result.stderr)

    def _unresponsive(self, record: CommandRecord) -> CommandTimeout:
        """The error for a command that did not end when killed, or that nothing could
        kill: a live command would hold up every later one, so the machine is stopped."""
        self._raise_if_down()
        assert record.budget_ns is not None
        budget = f"{record.budget_ns / NS_PER_S:g} s"
        why = ("did not end when killed" if record.killed_ns is not None or record.guest_kills
               else "could not be killed (over polled files only a command given timeout= is)")
        tail = self.console_tail()
        self.crashed(f"stopped after command {record.command!r} outlived its budget of "
                     f"{budget} (virtual) and {why}")
        return CommandTimeout(self.name, f"command {record.command!r} did not finish within "
                              f"{budget} of virtual time and {why}; the machine was stopped "
                              f"(later calls on it raise)", self.sim.now_ns, tail,
                              self.console_log(), command=record.command,
                              timeout_ns=record.budget_ns)

    def _read_result(self, record: CommandRecord) -> CommandResult:
        try:
            stdout, stderr = (self.channel.read(record.number, name)
                              for name in ("stdout", "stderr"))
            status = self.channel.exit_status(record)
        except (OSError, ValueError, IndexError) as exc:
            raise MachineError(self.name, f"the result of command {record.command!r} is "
                               f"unreadable: the guest removed or replaced "
                               f"/mnt/cmd/{record.number} ({exc})",
                               self.sim.now_ns, self.console_tail(), self.console_log()) from None
        assert record.started_ns is not None and record.ended_ns is not None
        result = CommandResult(record.command, status, stdout, stderr,
                               record.started_ns, record.ended_ns)
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
        """The guest rang the doorbell (the polling agent does, as commands start and end)."""
        self.doorbells.append((self.sim.calendar.now, value))
        self.channel.on_doorbell(value)

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

    def _catch_up_console(self, now: int | None = None) -> None:
        """Read what is still in the pty and give everything held the present time
        (``now``, if the caller knows it)."""
        # poll() on the pty runs the tty's pending flush first (n_tty_poll), as a read
        # does: it sees all the kernel wrote, and costs less than a read that fails.
        if self.console is not None and self._pty_fd >= 0:
            data = self._drain_pty() if self._pty_poll.poll(0) else None
            if data:
                self.console.hold(data)
            self.console.stamp(self.sim.calendar.now if now is None else now)

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
            try:
                kill_process_tree(self.process.pid, reap_root=False)
            except KillError as exc:
                raise MachineError(self.name, f"its host {exc}", self.sim.now_ns) from exc
            self.process.wait()

    def close(self, keep_directory: bool = False, polite: bool = True) -> None:
        """Power off politely if possible, then make sure nothing of the machine remains."""
        try:
            if polite and self.alive and self.state is MachineState.READY:
                self.poweroff()
                self._gather_coverage()
        except MachineError:
            pass  # the kill below ends it either way; the error stays in self.error
        finally:
            self._release(keep_directory)

    def _gather_coverage(self) -> None:
        """A coverage kernel writes its counts as its process exits, after the halt that
        powered it off: wait for that (bounded in wall time), then take them."""
        sink = self.sim.coverage
        if sink is None or self.state is not MachineState.OFF or self.process is None:
            return
        assert self.process.pid is not None
        if wait_for_exit(self.process.pid, COVERAGE_EXIT_WALL_TIMEOUT):
            sink.harvest(self.name, self.directory)
        else:
            sink.missed.append(f"{self.name}: the kernel did not exit within "
                               f"{COVERAGE_EXIT_WALL_TIMEOUT:g} s of its halt")

    def _release(self, keep_directory: bool) -> None:
        self.kill()
        self._catch_up_console()
        if self._pty_fd >= 0:
            self.sim.calendar.remove_reader(self._pty_fd)
            self._pty_poll.unregister(self._pty_fd)
            self._pty_fd = -1
        if self._pidfd >= 0:
            self._on_process_exit()
        if self.process is not None:
            self.process.close(force=True)
        if self.console is not None:
            self.console.close()
        self.channel.close()
        for device in self.devices:
            device.close()
        if self.state is not MachineState.CRASHED:
            self.state = MachineState.OFF
        if not keep_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            if self.console is not None:
                self.console.log_path.unlink(missing_ok=True)

