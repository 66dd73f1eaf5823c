"""A simulation: one calendar, one private directory, and the machines on its clock.

The clock moves only inside calls such as :meth:`Simulation.run_until`,
:meth:`Machine.run <pytest_umtt.uml.machine.Machine.run>` or
:meth:`Machine.expect <pytest_umtt.uml.machine.Machine.expect>`, so whatever the caller does
between two calls happens at one virtual instant.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import psutil

from .controller import (
    Calendar,
    Client,
    Decisions,
    Stop,
    StopReason,
    Trace,
    TraceEvent,
    WallBudget,
)
from .controller.spin import SpinPolicy
from .devices import VirtioDevice
from .errors import (
    NS_PER_S,
    BootError,
    ConfinementError,
    MachineError,
    MachineStalled,
    ProtocolError,
    StallError,
    UmttError,
    WallBudgetError,
    creep_diagnosis,
    format_ns,
)
from .kernel import (
    build_shim,
    check_kernel,
    default_kernel,
    has_virtio_console,
    kernel_identity,
    modules_dir,
)
from .placement import CpuSetting, Placement, choose_cpu
from .rootfs import Rootfs
from .uml.confine import confinement_problem, refusal
from .uml.launch import DEFAULT_MEM, DEFAULT_TIME_TRAVEL_START_NS, ROOTFS_FROM_MACHINE_DIR
from .uml.machine import (
    DEFAULT_COMMAND_TIMEOUT,
    CountsSink,
    Machine,
    MachineState,
)
from .units import either, seconds_to_ns, warn_unit_changed

DEFAULT_CONSOLE_RESOLUTION_NS = 1_000_000
"""1 ms: while an expect() waits, how far a kernel may run without telling the calendar;
it bounds how late a console line is stamped, at one round trip per busy virtual ms."""
DEFAULT_MAX_FREE_RUN_NS = 24 * 3600 * NS_PER_S
"""A day: without a bound, a lone kernel free-runs through its own periodic timers for
2^62 ns and the calendar never learns where it is. A day of virtual time costs a lone
kernel about 1.5 s of wall time and two messages."""
DEFAULT_WALL_TIMEOUT = 30.0
WALL_PER_VIRTUAL_SECOND = 10.0
"""A run may take ``wall_timeout`` plus this many wall seconds per virtual second up to
its deadline; past that, one whose virtual time advanced less than a tenth of the wall
time is spinning, not working, and is ended (:class:`.controller.WallBudget`)."""
WALL_BUDGET_SPAN_CAP = 60.0
"""The virtual span that sets that patience is at most this: a run with no deadline, or
one a day away (a command without a timeout), is judged after ``wall_timeout`` + 600 s."""
PERTURBED_DOORBELL_LATENCY_NS = 1_000_000
"""With perturbation on, a doorbell's pause (a command's end, say) comes up to 1 ms late."""
DEFAULT_BOOT_TIMEOUT = 60.0
SUN_PATH_MAX = 108


def _digest(data: bytes) -> str:
    return f"{len(data)}:{hashlib.sha256(data).hexdigest()[:16]}"


OWNER_FILE = "owner"
"""In a simulation's own directory: the pid and start time of the process that made it,
so that a later session can remove what a killed one left behind."""


def _make_directory(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit is not None:
        path = Path(explicit)
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path
    try:
        path = Path(tempfile.mkdtemp(prefix="umtt-"))
    except OSError as exc:
        raise UmttError(f"cannot make a simulation directory in {tempfile.gettempdir()} "
                        f"(TMPDIR={os.environ.get('TMPDIR', 'unset')}): {exc}") from None
    (path / OWNER_FILE).write_text(_owner_stamp(os.getpid()))
    return path


def owned_directory() -> Path:
    """A new directory under TMPDIR, stamped with this process, that a later session's
    :func:`remove_stale_directories` removes if this process dies without doing so."""
    return _make_directory(None)


def _owner_stamp(pid: int) -> str:
    try:
        return f"{pid} {psutil.Process(pid).create_time()}"
    except psutil.NoSuchProcess:
        return ""


def remove_stale_directories(base: Path | None = None) -> list[Path]:
    """Remove the simulation directories whose owner is gone (a session that was
    SIGKILLed cannot clean up after itself); the paths removed."""
    removed = []
    for path in Path(base or tempfile.gettempdir()).glob("umtt-*"):
        try:
            stamp = (path / OWNER_FILE).read_text()
        except OSError:
            continue
        pid = int(stamp.split()[0]) if stamp.split() else 0
        if pid <= 0 or _owner_stamp(pid) != stamp:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class MachineFactory(Protocol):
    """What the ``umtt_machine_factory`` fixture is: make (and by default boot) a machine."""

    def __call__(self, name: str | None = None, *, boot: bool = True, mem: str | None = None,
                 cmdline: Sequence[str] = (), devices: Sequence[VirtioDevice] = ()) -> Machine:
        ...


@dataclass
class Elapsed:
    """Virtual time spent in a ``with sim.elapsed():`` block (``end_ns`` set on exit):
    ``start``, ``end`` and ``duration`` in seconds, ``*_ns`` exact."""

    start_ns: int
    end_ns: int | None = None

    @property
    def start(self) -> float:
        """Virtual time the block began, in seconds."""
        return self.start_ns / NS_PER_S

    @property
    def end(self) -> float:
        """Virtual time the block ended, in seconds."""
        return self._end_ns() / NS_PER_S

    @property
    def duration_ns(self) -> int:
        """Virtual time the block took, exact."""
        return self._end_ns() - self.start_ns

    @property
    def duration(self) -> float:
        """Virtual seconds the block took."""
        return self.duration_ns / NS_PER_S

    def _end_ns(self) -> int:
        assert self.end_ns is not None, "the block has not ended"
        return self.end_ns


@dataclass(frozen=True)
class RunStop:
    """Why and when :meth:`Simulation.run_until` or :meth:`Simulation.advance` returned:
    ``time`` in seconds, ``time_ns`` exact; for a doorbell, the ``machine`` that rang
    it and its ``value``."""

    reason: StopReason
    time_ns: int
    machine: Machine | None = None
    value: int | None = None
    client: Client | None = None
    """The machine's calendar client (the protocol's view of it)."""

    @property
    def time(self) -> float:
        """When the run stopped, in virtual seconds (it used to be nanoseconds: the
        first use in a process warns, :class:`~pytest_umtt.units.UnitChangedWarning`)."""
        warn_unit_changed("RunStop.time (what run_until() and advance() return)",
                          "RunStop.time_ns")
        return self.time_ns / NS_PER_S


MEMORY_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def memory_bytes(mem: str) -> int:
    """Bytes in a UML memory size (``128M``, ``1G``, ``65536K``, or plain bytes)."""
    unit = MEMORY_UNITS.get(mem[-1:].upper(), 1)
    digits = mem[:-1] if unit > 1 else mem
    if not digits.isdigit():
        raise ValueError(f"mem={mem!r}: expected a size like 128M or 1G")
    return int(digits) * unit


def _confinement(wanted: bool) -> bool:
    problem = confinement_problem() if wanted else None
    if problem is not None:
        raise ConfinementError(refusal(problem))
    return wanted


class Simulation:
    """Virtual time for a set of UML machines; use as a context manager."""

    def __init__(
        self,
        *,
        kernel: str | os.PathLike[str] | None = None,
        seed: int = 0,
        directory: str | os.PathLike[str] | None = None,
        shm: bool = True,
        deterministic: bool = True,
        wall_timeout: float = DEFAULT_WALL_TIMEOUT,
        console_resolution_ns: int = DEFAULT_CONSOLE_RESOLUTION_NS,
        max_free_run_ns: int = DEFAULT_MAX_FREE_RUN_NS,
        time_travel_start_ns: int = DEFAULT_TIME_TRAVEL_START_NS,
        trace: bool = True,
        perturb: bool = False,
        rootfs: Rootfs | None = None,
        confine: bool = True,
        decisions: Decisions | None = None,
        shim: Path | None = None,
        coverage: CountsSink | None = None,
        cpu: CpuSetting = "auto",
    ) -> None:
        self.kernel = None if kernel is None else Path(kernel)
        self.placement = Placement(choose_cpu(cpu))
        """The one CPU the kernels and the calendar's thread (while it drives the
        calendar) run on (:mod:`pytest_umtt.placement`); ``cpu=None``: not placed."""
        self.coverage = coverage
        """Where a coverage kernel's counts go as each machine closes
        (:mod:`pytest_umtt.coverage`); None: not gathered."""
        self.confined = _confinement(confine)
        """Whether UML processes may change nothing outside their machine directory
        (:mod:`pytest_umtt.uml.confine`): ``confine=True`` (the default) on a host that
        allows no mount namespace is a ConfinementError, never a silent False."""
        self.rootfs = rootfs
        self.seed = seed
        self.wall_timeout = wall_timeout
        """Wall seconds virtual time may stand still before the runner counts as hung."""
        self.time_travel_start_ns = time_travel_start_ns
        """The guests' wall clock at virtual time 0 (ns since the epoch)."""
        self.console_resolution_ns = console_resolution_ns
        """While an expect() waits, how far a kernel may run without telling the calendar."""
        self.decisions = Decisions() if decisions is None else decisions
        """Every perturbed decision of the run (ties and doorbells with ``perturb``, a
        seeded network's losses and reorderings), and which of them to apply."""
        # First: building it may fail. A replay brings its own (shim=), built elsewhere.
        self.shim = shim if shim is not None else build_shim() if deterministic else None
        self._own_directory = directory is None
        self.directory = _make_directory(directory)
        self.calendar = Calendar(shm=shm, max_free_run=max_free_run_ns,
                                 tie_seed=seed if perturb else None,
                                 doorbell_latency=PERTURBED_DOORBELL_LATENCY_NS if perturb else 0,
                                 decisions=self.decisions,
                                 trace=Trace() if trace else None, pause_on_broadcast=True,
                                 time_at_start=time_travel_start_ns,
                                 # Sharing its CPU with the kernels, it must never spin.
                                 spin=SpinPolicy() if self.placement.cpu is None else None)
        self.calendar.on_drop.append(self._on_drop)
        self.calendar.on_wait.append(self._on_wait)
        self.machines: dict[str, Machine] = {}
        self._machines_by_client: dict[Client, Machine] = {}  # kernels that connected
        self.on_doorbell: list[Callable[[Machine, int], None]] = []
        self._closed = False
        self._directory_fd = -1
        self._open_directory()

    def _open_directory(self) -> None:
        """The root image's link and the calendar's socket; on failure, nothing stays."""
        try:
            if self.rootfs is not None:
                link = self.directory / Path(ROOTFS_FROM_MACHINE_DIR).name
                link.symlink_to(self.rootfs.boot_image or self.rootfs.image)
            self.calendar.listen(self._socket_path())
        except BaseException:
            self._remove_files()
            raise

    def _socket_path(self) -> Path:
        """Where the calendar listens."""
        return Path(self.bind_path("time.sock"))

    def bind_path(self, name: str) -> str:
        """Where to bind a socket ``name`` in the simulation's directory. A socket's path
        must fit in 108 bytes; UML finds it relative to its directory, but binding needs
        a name: for a deep directory, the name goes through a descriptor of it instead."""
        path = self.directory / name
        if len(os.fsencode(path)) < SUN_PATH_MAX:
            return str(path)
        if self._directory_fd < 0:
            self._directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        return f"/proc/self/fd/{self._directory_fd}/{name}"

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # After an error or Ctrl-C a guest may be spinning: no politeness, just the kill.
        self.close(polite=exc_type is None)

    def __repr__(self) -> str:
        return f"<Simulation now={self.now:.9f} s machines={list(self.machines)}>"

    @property
    def now(self) -> float:
        """Virtual time in seconds (``now_ns`` is exact)."""
        return self.calendar.now / NS_PER_S

    @property
    def now_ns(self) -> int:
        """Virtual time in nanoseconds, exact."""
        return self.calendar.now

    @contextmanager
    def elapsed(self, *, at_least: float | None = None, at_most: float | None = None,
                exactly: float | None = None) -> Iterator[Elapsed]:
        """Assert how much virtual time (seconds) the block takes::

            with sim.elapsed(at_least=5, at_most=5.001):
                machine.run("sleep 5")
        """
        __tracebackhide__ = True
        measured = Elapsed(self.now_ns)
        yield measured
        measured.end_ns = self.now_ns
        took = measured.duration
        wanted = [(exactly is not None and measured.duration_ns != seconds_to_ns(exactly),
                   f"exactly {exactly}"),
                  (at_least is not None and took < at_least, f"at least {at_least}"),
                  (at_most is not None and took > at_most, f"at most {at_most}")]
        for failed, expectation in wanted:
            if failed:
                raise AssertionError(
                    f"the block took {format_ns(measured.duration_ns)} of virtual time, "
                    f"expected {expectation} s (from {format_ns(measured.start_ns)} to "
                    f"{format_ns(measured.end_ns)})")

    # --- machines -------------------------------------------------------------------

    def machine(self, name: str | None = None, *, boot: bool = True, kernel: Path | None = None,
                mem: str = DEFAULT_MEM, cmdline: Sequence[str] = (),
                idle_max: float = 0.1, agent: Path | None = None,
                default_timeout: float = DEFAULT_COMMAND_TIMEOUT,
                devices: Sequence[VirtioDevice] = (),
                agent_console: bool | None = None) -> Machine:
        """Create a machine (and boot it, unless ``boot=False``). ``agent`` replaces the
        guest agent as init (it must ring the doorbell as uml/agent.sh does); ``devices``
        are virtio device models the kernel finds at boot (:mod:`pytest_umtt.devices`);
        ``agent_console`` picks the agent's channel: virtio-console (the default when the
        kernel has the driver) or polled files (False, or a kernel without it)."""
        name = name or f"m{len(self.machines) + 1}"
        if name in self.machines or not name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"machine name {name!r} is taken or not a plain name")
        kernel = self._kernel(name, kernel)
        self._check_memory(name, mem)
        machine = Machine(self, name, len(self.machines) + 1, kernel=kernel,
                          mem=mem, cmdline=cmdline, idle_max=idle_max, agent=agent,
                          default_timeout=default_timeout, rootfs=self.rootfs is not None,
                          devices=devices, modules=modules_dir(kernel),
                          agent_console=has_virtio_console(kernel) and agent_console is not False)
        self.machines[name] = machine
        if boot:
            self.boot(machine)
        return machine

    def _check_memory(self, name: str, mem: str) -> None:
        """A machine too small for the pinned root is refused before it boots (the kernel
        would panic with "No working init found" or "System is deadlocked on memory")."""
        if self.rootfs is None:
            return
        needed = self.rootfs.minimum_memory
        if memory_bytes(mem) < needed:
            raise BootError(name, f"mem={mem} is too small for the pinned root: it needs at "
                            f"least {needed // 2**20}M (the compressed image and the "
                            f"{self.rootfs.image.stat().st_size / 2**20:.0f} MiB it unpacks to "
                            f"are both in guest memory while the kernel boots, beside the "
                            f"kernel's own); give it more, or use --umtt-rootfs=host",
                            self.now_ns)

    def _kernel(self, machine: str, explicit: Path | None) -> Path:
        """The kernel ``machine`` boots, checked before it is started."""
        kernel = explicit or self.kernel or default_kernel()
        if kernel is None:
            raise BootError(machine, "no kernel: pass one, or build the default with "
                            "`umtt-kernel build`", self.now_ns)
        result = check_kernel(kernel)
        if not result.ok:
            raise BootError(machine, f"kernel {kernel}: {'; '.join(result.problems)}",
                            self.now_ns)
        return kernel

    def boot(self, *machines: Machine, timeout: float = DEFAULT_BOOT_TIMEOUT) -> None:
        """Start machines together and run until each agent is ready. Machines started
        at virtual time 0 get shared memory; later ones are served over messages."""
        for machine in machines:
            machine.spawn()
            self._trace_identity(machine)
        with self.placement.driving():
            connected = self.calendar.serve_until(
                lambda: all(self._client_of(m) is not None or not m.alive for m in machines),
                wall_timeout=self.wall_timeout)
        for machine in machines:
            if self._client_of(machine) is None:
                machine.kill()
                what = ("the kernel exited before connecting to the calendar" if connected
                        else f"no START from the kernel within {self.wall_timeout} s wall")
                raise BootError(machine.name, what, self.now_ns, machine.console_tail(),
                                machine.console_log())
        self.run_until(lambda: all(m.state is MachineState.READY for m in machines),
                       deadline_ns=self.now_ns + seconds_to_ns(timeout), machines=machines)
        for machine in machines:
            if machine.state is not MachineState.READY:
                raise BootError(machine.name, f"the guest agent was not ready within {timeout} s"
                                f" of virtual time", self.now_ns, machine.console_tail(),
                                machine.console_log())

    def identity(self, machine: Machine) -> str:
        """What the machine runs: the kernel's banner and sha256, and the guest root."""
        root = "host / (hostfs)" if self.rootfs is None else self.rootfs.identity
        return f"kernel {kernel_identity(machine.kernel)}; root {root}"

    def _trace_identity(self, machine: Machine) -> None:
        if self.calendar.trace is not None:
            self.calendar.trace.add(TraceEvent(self.now_ns, "boot", machine.name,
                                               detail=self.identity(machine)))

    def _client_of(self, machine: Machine) -> Client | None:
        if machine.client is None:
            for client in self.calendar.clients:
                if client.start_id == machine.client_id:
                    client.label = machine.name
                    machine.client = client
                    self._machines_by_client[client] = machine
        return machine.client

    def _machine_of(self, client: Client) -> Machine | None:
        return self._machines_by_client.get(client)

    # --- running --------------------------------------------------------------------

    def run_until(self, condition: Callable[[], bool] | None = None, *,
                  deadline: float | None = None, deadline_ns: int | None = None,
                  machines: Iterable[Machine] = ()) -> RunStop:
        """Run until ``condition()``, the virtual instant ``deadline`` (seconds; or
        ``deadline_ns``, exact) or quiescence; doorbells are handled on the way. Raises
        when one of ``machines`` crashes or stalls."""
        deadline_ns = either("deadline", deadline, deadline_ns)
        with self.placement.driving():
            return self._run_until(condition, deadline_ns, tuple(machines))

    def _run_until(self, condition: Callable[[], bool] | None, deadline_ns: int | None,
                   watched: tuple[Machine, ...]) -> RunStop:
        budget = self._wall_budget(deadline_ns)
        while True:
            self._raise_for(watched)
            try:
                stop = self.calendar.run_until(
                    lambda: bool(condition and condition()) or self._trouble(watched),
                    deadline_ns=deadline_ns, stall_timeout=self.wall_timeout,
                    wall_budget=budget)
            except StallError as exc:
                raise self._stalled(exc) from None
            if stop.reason is StopReason.DOORBELL:
                self._doorbell(stop)
                if condition is not None and condition():
                    return self._run_stop(stop)
                continue
            self._raise_for(watched)
            return self._run_stop(stop)

    def _run_stop(self, stop: Stop) -> RunStop:
        machine = None if stop.client is None else self._machine_of(stop.client)
        return RunStop(stop.reason, stop.time, machine, stop.value, stop.client)

    @contextmanager
    def watched_closely(self, wall_timeout: float | None = None) -> Iterator[None]:
        """For a wait that must see time as it passes: no kernel free-runs more than the
        console resolution without telling, and (given) a shorter wall budget."""
        usual = self.wall_timeout, self.calendar.max_free_run
        if wall_timeout is not None:
            self.wall_timeout = wall_timeout
        self.calendar.max_free_run = self.console_resolution_ns
        try:
            yield
        finally:
            self.wall_timeout, self.calendar.max_free_run = usual

    def advance(self, seconds: float | None = None, *, seconds_ns: int | None = None
                ) -> RunStop:
        """Let exactly ``seconds`` of virtual time pass (or ``seconds_ns``, exact)."""
        span = either("seconds", seconds, seconds_ns)
        if span is None:
            raise TypeError("advance() needs seconds= or seconds_ns=")
        return self.run_until(deadline_ns=self.now_ns + span)

    def fingerprint(self) -> list[str]:
        """Everything that makes a run this run, one line per item: every protocol event
        with its virtual time, every console line with its virtual time, every command
        result. Two runs with one seed must give the same list.

        Protocol events are listed per virtual instant, per client, per kind (each group
        in the order it happened): what one kernel sent and received at one instant is
        fixed by the seed, but how that interleaves with other kernels' messages at the
        same instant, or a kernel's ACK with a reply the calendar sends it, follows the
        order in which the host delivers socket data."""
        lines = []
        if self.calendar.trace is not None:
            events = sorted(self.calendar.trace, key=lambda e: (e.now, e.client, e.kind))
            lines += [json.dumps(asdict(event), sort_keys=True) for event in events]
        for name, machine in self.machines.items():
            if machine.console is not None:
                lines += [f"console {name} {line}" for line in machine.console.lines]
            lines += [f"result {name} {r.command!r} status={r.status} "
                      f"{format_ns(r.started_ns)}..{format_ns(r.ended_ns)} "
                      f"stdout={_digest(r.stdout)} stderr={_digest(r.stderr)}"
                      for r in machine.results]
        return lines

    def _doorbell(self, stop: Stop) -> None:
        assert stop.client is not None and stop.value is not None
        machine = self._machine_of(stop.client)
        if machine is None:
            return
        machine.on_doorbell(stop.value)
        for handler in self.on_doorbell:
            handler(machine, stop.value)

    def _trouble(self, machines: tuple[Machine, ...]) -> bool:
        # Asked before every dispatch: a loop, not any() over a generator.
        for machine in machines:
            if machine.error is not None or machine.crash_cause() is not None:
                return True
        return False

    def _raise_for(self, machines: tuple[Machine, ...]) -> None:
        for machine in machines:
            cause = machine.error.what if machine.error is not None else machine.crash_cause()
            if cause is not None:
                raise machine.crashed(cause)

    def _wall_budget(self, deadline_ns: int | None) -> WallBudget:
        """How slowly a run that starts now and ends at ``deadline_ns`` may creep."""
        now = self.calendar.now
        span = WALL_BUDGET_SPAN_CAP if deadline_ns is None else \
            min(max(deadline_ns - now, 0) / NS_PER_S, WALL_BUDGET_SPAN_CAP)
        return WallBudget(now, time.monotonic(), self.wall_timeout + WALL_PER_VIRTUAL_SECOND * span,
                          1 / WALL_PER_VIRTUAL_SECOND)

    def _stalled(self, exc: StallError) -> MachineError:
        """Stop the machine that held the CPU, and say why; the simulation goes on."""
        runner = self.calendar.runner
        machine = self._machine_of(runner) if runner is not None else None
        if machine is None:
            names = ", ".join(self.machines) or "no machine"  # none held the CPU
            return MachineStalled(names, str(exc), exc.now_ns)
        what = creep_diagnosis(exc.advanced_ns, exc.waited) \
            if isinstance(exc, WallBudgetError) else \
            (f"virtual time stalled at {format_ns(exc.now_ns)} for {exc.waited:.1f} s wall "
             f"(the guest never lets time advance: a busy loop?)")
        error = MachineStalled(machine.name, what, exc.now_ns, machine.console_tail(),
                               machine.console_log())
        machine.stalled(error)
        return error

    def _on_wait(self, client: Client) -> None:
        machine = self._machine_of(client)
        if machine is not None:
            machine.on_wait()

    def _on_drop(self, client: Client, error: ProtocolError | None) -> None:
        machine = self._machine_of(client)
        if machine is None:
            return
        if error is not None:
            machine.crashed(f"protocol error: {error}")
        else:
            machine.on_disconnect()

    # --- teardown -------------------------------------------------------------------

    def close(self, polite: bool = True, keep_files: bool = False) -> None:
        """Power off every machine (``polite``), kill what remains, close the calendar and
        remove the files (unless ``keep_files``: then the caller removes the directory)."""
        if self._closed:
            return
        self._closed = True
        try:
            for machine in self.machines.values():
                machine.close(polite=polite, keep_directory=keep_files)
        finally:
            self._remove_files(keep=keep_files)

    def _remove_files(self, keep: bool = False) -> None:
        self.calendar.close()
        if self._directory_fd >= 0:
            os.close(self._directory_fd)
            self._directory_fd = -1
        if self._own_directory and not keep:
            shutil.rmtree(self.directory, ignore_errors=True)
