"""The pytest plugin: options, fixtures, markers and reports over Simulation and Machine.

Thin by design: everything here delegates to :mod:`pytest_umtt.simulation` and
:mod:`pytest_umtt.machine`, which work without pytest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from . import hookspecs, kselftest
from .console import Console
from .errors import UmttError, format_ns
from .kernel import KernelError, build_shim, default_kernel, kernel_identity
from .kselftest import (
    GUEST_TREE,
    LIST_FILE,
    KselftestResult,
    KselftestTest,
    Outcome,
    read_tests,
    run_kselftest,
    virtual_budget,
)
from .ktap import KtapCase, parse_ktap
from .machine import DEFAULT_COMMAND_TIMEOUT, DEFAULT_MEM, Machine
from .rootfs import Rootfs, build_rootfs
from .simulation import (
    DEFAULT_STALL_TIMEOUT,
    MachineFactory,
    Simulation,
    first_difference,
    remove_stale_directories,
)
from .summary import EXPLORED_SEED, FINGERPRINT, Summary, SummaryReporter

MEM_PATTERN = re.compile(r"^\d+[KMG]$")
PROTOCOL_TAIL = 30
CONSOLE_TAIL = 40
KSELFTEST_TIMEOUT = kselftest.DEFAULT_TIMEOUT
KSELFTEST_WALL_TIMEOUT = kselftest.DEFAULT_WALL_TIMEOUT


# --- settings: every one as CLI, env and ini, resolved in one place ---------------------

@dataclass(frozen=True)
class Settings:
    """The effective configuration of a test's simulation."""

    kernel: Path | None
    seed: int
    mem: str = DEFAULT_MEM
    cmdline: tuple[str, ...] = ()
    virtual_timeout: float = DEFAULT_COMMAND_TIMEOUT
    wall_timeout: float = DEFAULT_STALL_TIMEOUT
    artifacts: Path | None = None
    seed_source: str = "default"
    kunit: str | None = None
    explore: int = 0
    check_determinism: bool = False
    perturb: bool = False
    rootfs: str = "pinned"
    kselftest: Path | None = None
    kselftest_timeout: float | None = None  # None: the tree's settings, else 45 s
    kselftest_wall_timeout: float = KSELFTEST_WALL_TIMEOUT


@dataclass(frozen=True)
class Option:
    name: str  # ini key; the CLI flag and env variable derive from it
    flag: str
    help: str
    metavar: str | None  # None: an on/off switch

    @property
    def env(self) -> str:
        return self.name.upper()


OPTIONS = (
    Option("umtt_kernel", "--uml-kernel", "UML kernel with time-travel support "
           "(default: the one `umtt-kernel build` made)", "PATH"),
    Option("umtt_seed", "--umtt-seed", "seed of every simulation: an integer, or 'random' "
           "(default 0: plain runs are reproducible)", "N"),
    Option("umtt_mem", "--umtt-mem",
           f"memory of each machine, e.g. 512M (default {DEFAULT_MEM})", "SIZE"),
    Option("umtt_cmdline", "--umtt-cmdline", "extra kernel command-line arguments for every "
           "machine (shell quoting)", "ARGS"),
    Option("umtt_virtual_timeout", "--umtt-virtual-timeout", "virtual seconds a command may "
           f"take when the test gives no timeout (default {DEFAULT_COMMAND_TIMEOUT:g})",
           "SECONDS"),
    Option("umtt_wall_timeout", "--umtt-wall-timeout", "wall seconds virtual time may stand "
           f"still before a machine counts as hung (default {DEFAULT_STALL_TIMEOUT:g})",
           "SECONDS"),
    Option("umtt_artifacts", "--umtt-artifacts", "directory for per-test artifacts: consoles, "
           "commands, protocol trace (default: none kept)", "DIR"),
    Option("umtt_kunit", "--umtt-kunit", "run the kernel's KUnit suites matching GLOB at boot "
           "and report each test case as a test", "GLOB"),
    Option("umtt_explore", "--umtt-explore", "run each test with K seeds (the seed, seed+1, "
           "...) and report which seeds failed", "K"),
    Option("umtt_check_determinism", "--umtt-check-determinism", "run each test twice with "
           "one seed and fail if the runs differ (protocol, console, results)", None),
    Option("umtt_perturb", "--umtt-perturb", "seeded perturbation of the order of events at "
           "the same virtual instant, to shake out races between machines", None),
    Option("umtt_rootfs", "--umtt-rootfs", "the guest's root filesystem: 'pinned' (default; "
           "built from Debian packages, the same on every host) or 'host' (the host's / "
           "read-only through hostfs)", "pinned|host"),
    Option("umtt_kselftest", "--umtt-kselftest", "run the installed kselftest tree DIR "
           "(`make -C tools/testing/selftests install INSTALL_PATH=DIR`, or `umtt-kselftest "
           "build`), each test in a fresh machine; each test and KTAP subtest a test", "DIR"),
    Option("umtt_kselftest_timeout", "--umtt-kselftest-timeout", "virtual seconds each "
           "kselftest may take, overriding its collection's settings file (default: that "
           f"file's timeout, else kselftest's {KSELFTEST_TIMEOUT:g})", "SECONDS"),
    Option("umtt_kselftest_wall_timeout", "--umtt-kselftest-wall-timeout", "wall seconds "
           "each kselftest may take before it is stopped and diagnosed (default "
           f"{KSELFTEST_WALL_TIMEOUT:g}; UML runs clock-polling loops about 100x "
           "slower than real time)", "SECONDS"),
)
ROOTFS_CHOICES = ("pinned", "host")


def _raw_setting(config: pytest.Config, option: Option) -> tuple[str, str] | None:
    """The first of CLI, environment and ini that sets ``option``, with where it came from."""
    cli = config.getoption(option.name)
    if cli is not None:
        return str(cli), option.flag
    if option.env in os.environ:
        return os.environ[option.env], f"${option.env}"
    ini = config.getini(option.name)
    if ini:
        return str(ini), f"ini {option.name}"
    return None


MAX_SECONDS = 1e9
"""About 31 years: far beyond any test, and its nanoseconds still fit the protocol's s64."""


def _positive_float(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_SECONDS:  # also refuses nan
        raise pytest.UsageError(f"{where}: expected a number of seconds above 0 and at most "
                                f"{MAX_SECONDS:g}, got {text!r}")
    return value


def _arguments(value: object, where: str) -> tuple[str, ...]:
    """Kernel arguments: one shell-quoted string, or a list of strings."""
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise pytest.UsageError(f"{where}: cannot split {value!r} into kernel arguments "
                                    f"({exc})") from None
    if isinstance(value, list | tuple) and all(isinstance(arg, str) for arg in value):
        return tuple(value)
    raise pytest.UsageError(f"{where}: expected kernel arguments as a string or a list of "
                            f"strings, got {value!r}")


def _seed(text: str, where: str) -> tuple[int, str]:
    if text == "random":
        return random.SystemRandom().randrange(2**32), f"random ({where})"
    try:
        return int(text, 0), where
    except ValueError:
        raise pytest.UsageError(f"{where}: expected an integer seed or 'random', "
                                f"got {text!r}") from None


def _mem(text: object, where: str) -> str:
    if not isinstance(text, str) or not MEM_PATTERN.match(text):
        raise pytest.UsageError(f"{where}: expected a size like 64M or 1G, got {text!r}")
    return text


def _switch(text: str, where: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise pytest.UsageError(f"{where}: expected true or false, got {text!r}")


def _count(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"{where}: expected a number of seeds (1 or more), got {text!r}")
    return int(text)


def _rootfs(text: str, where: str) -> str:
    if text not in ROOTFS_CHOICES:
        raise pytest.UsageError(f"{where}: expected one of {', '.join(ROOTFS_CHOICES)}, "
                                f"got {text!r}")
    return text


def _kernel(text: str, where: str) -> Path:
    # Absolute: UML starts in its machine's directory, where a relative name means nothing.
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise pytest.UsageError(f"{where}: no kernel at {text!r}")
    return path


def _kselftest_tree(text: str, where: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not (path / LIST_FILE).is_file():
        raise pytest.UsageError(f"{where}: {text!r} is not an installed kselftest tree (no "
                                f"{LIST_FILE}); make one with `umtt-kselftest build "
                                f"--targets TARGET` or `make -C tools/testing/selftests "
                                f"TARGETS=... install INSTALL_PATH=DIR`")
    return path


def resolve_settings(config: pytest.Config) -> Settings:
    """Settings from CLI > environment > ini; bad values are a UsageError naming the fix."""
    raw = {option.name: _raw_setting(config, option) for option in OPTIONS}

    def get(name: str, parse: Callable[[str, str], Any], default: Any) -> Any:
        found = raw[name]
        return default if found is None else parse(*found)

    seed, seed_source = get("umtt_seed", _seed, (0, "default"))
    return Settings(
        kernel=get("umtt_kernel", _kernel, None) or default_kernel(),
        seed=seed,
        seed_source=seed_source,
        mem=get("umtt_mem", _mem, DEFAULT_MEM),
        cmdline=get("umtt_cmdline", _arguments, ()),
        virtual_timeout=get("umtt_virtual_timeout", _positive_float, DEFAULT_COMMAND_TIMEOUT),
        wall_timeout=get("umtt_wall_timeout", _positive_float, DEFAULT_STALL_TIMEOUT),
        artifacts=get("umtt_artifacts", lambda text, _: Path(text), None),
        kunit=get("umtt_kunit", lambda text, _: text, None),
        explore=get("umtt_explore", _count, 0),
        check_determinism=get("umtt_check_determinism", _switch, False),
        perturb=get("umtt_perturb", _switch, False),
        rootfs=get("umtt_rootfs", _rootfs, "pinned"),
        kselftest=get("umtt_kselftest", _kselftest_tree, None),
        kselftest_timeout=get("umtt_kselftest_timeout", _positive_float, None),
        kselftest_wall_timeout=get("umtt_kselftest_wall_timeout", _positive_float,
                                   KSELFTEST_WALL_TIMEOUT),
    )


# --- markers ------------------------------------------------------------------------

MARKERS = {
    "uml": "uml(mem=None, cmdline=None, kernel=None): options for this test's machines",
    "virtual_timeout": "virtual_timeout(seconds): virtual-time budget of each command",
    "wall_timeout": "wall_timeout(seconds): wall seconds virtual time may stand still",
    "umtt_seed": "umtt_seed(n): this test's simulation seed",
}
_MARKER_ARGS = {"uml": ((), {"mem", "cmdline", "kernel"}),
                "virtual_timeout": (("seconds",), set()),
                "wall_timeout": (("seconds",), set()),
                "umtt_seed": (("n",), set())}


def _marker_values(item: pytest.Item, name: str) -> dict[str, Any] | None:
    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    positional, keywords = _MARKER_ARGS[name]
    where = f"{item.nodeid}: @pytest.mark.{MARKERS[name].split(':')[0]}"
    if len(marker.args) > len(positional) or set(marker.kwargs) - keywords - set(positional):
        raise pytest.UsageError(f"{where} got {marker.args} {marker.kwargs}")
    values = dict(zip(positional, marker.args, strict=False))
    values.update(marker.kwargs)
    if set(positional) - set(values):
        raise pytest.UsageError(f"{where} needs {', '.join(positional)}")
    return values


def item_settings(item: pytest.Item, base: Settings) -> Settings:
    """The settings of one test: markers override everything else."""
    settings = base
    where = f"{item.nodeid}: marker"
    if (uml := _marker_values(item, "uml")) is not None:
        cmdline = _arguments(uml["cmdline"], where) if "cmdline" in uml else ()
        settings = replace(
            settings,
            mem=_mem(uml["mem"], where) if "mem" in uml else settings.mem,
            cmdline=settings.cmdline + cmdline,
            kernel=_kernel(str(uml["kernel"]), where) if uml.get("kernel") else settings.kernel)
    if (value := _marker_values(item, "virtual_timeout")) is not None:
        settings = replace(settings,
                           virtual_timeout=_positive_float(str(value["seconds"]), where))
    if (value := _marker_values(item, "wall_timeout")) is not None:
        settings = replace(settings, wall_timeout=_positive_float(str(value["seconds"]), where))
    if (value := _marker_values(item, "umtt_seed")) is not None:
        seed, source = _seed(str(value["n"]), where)
        settings = replace(settings, seed=seed, seed_source=source)
    return settings


# --- session state ------------------------------------------------------------------

@dataclass
class SessionState:
    """What the plugin keeps for a session (in config.stash, never in globals)."""

    settings: Settings
    summary: Summary = field(default_factory=Summary)
    open: set[Simulation] = field(default_factory=set)
    first_runs: dict[str, list[str]] = field(default_factory=dict)
    rootfs: Rootfs | None = None
    previous_sigterm: signal.Handlers | None = None

    def guest_root(self) -> Rootfs | None:
        """The pinned root filesystem (built once per session, cached across sessions),
        or None for the host's root."""
        if self.settings.rootfs == "host":
            return None
        if self.rootfs is None:
            self.rootfs = build_rootfs()
        return self.rootfs


@dataclass(frozen=True)
class Variant:
    """How one item varies a test: an explored seed, a determinism run, or neither."""

    seed: int | None = None
    run: int | None = None

    @property
    def id(self) -> str:
        parts = [] if self.seed is None else [f"seed={self.seed}"]
        return "-".join(parts + ([] if self.run is None else [f"determinism-{self.run}"]))


VARIANT_ID = re.compile(r"-?(seed=\d+|determinism-[12])")


def base_nodeid(nodeid: str) -> str:
    """The test's node id without the variant pytest-umtt added."""
    return VARIANT_ID.sub("", nodeid).replace("[]", "").replace("[-", "[")


STATE = pytest.StashKey[SessionState]()
ITEM_SIM = pytest.StashKey[Simulation]()
ITEM_SETTINGS = pytest.StashKey[Settings]()


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("umtt", "virtual-time UML kernels (pytest-umtt)")
    for option in OPTIONS:
        help_text = f"{option.help}; env {option.env}, ini {option.name}"
        if option.metavar is None:
            group.addoption(option.flag, dest=option.name, action="store_const", const="true",
                            help=help_text)
        else:
            group.addoption(option.flag, dest=option.name, metavar=option.metavar,
                            help=help_text)
        parser.addini(option.name, option.help)


def pytest_configure(config: pytest.Config) -> None:
    for text in MARKERS.values():
        config.addinivalue_line("markers", text)
    state = SessionState(resolve_settings(config))
    config.stash[STATE] = state
    config.pluginmanager.register(SummaryReporter(
        state.summary, worker=hasattr(config, "workerinput"), base_nodeid=base_nodeid),
        "umtt-summary")
    if not hasattr(config, "workerinput"):  # xdist workers' owners are alive anyway
        remove_stale_directories()
    state.previous_sigterm = _sigterm_as_interrupt()


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is None:
        return
    for sim in list(state.open):
        sim.close(polite=False)  # interrupted runs: no machine outlives the session
    if state.previous_sigterm is not None:
        signal.signal(signal.SIGTERM, state.previous_sigterm)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _sigterm_as_interrupt() -> signal.Handlers | None:
    """SIGTERM ends the session like Ctrl-C, so every machine is torn down (the default
    action would leave no chance to). Only where nobody else handles it already."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return None
    signal.signal(signal.SIGTERM, _interrupt)
    return signal.SIG_DFL


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    base = config.stash[STATE].settings
    for item in items:
        item.stash[ITEM_SETTINGS] = item_settings(item, base)
    if base.kunit is not None:
        # First, so that -k and other deselection apply to KUnit cases too.
        items.extend(KunitRun.from_parent(session, name="kunit").collect())
    if base.kselftest is not None:
        items.extend(KselftestRun.from_parent(session, name="kselftest").collect())


class KunitFailure(Exception):
    """A KUnit case reported ``not ok``."""


class KunitRun(pytest.Collector):
    """The kernel's KUnit suites, run at boot; one item per test case (KTAP)."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        glob = settings.kunit or "*"
        started = time.monotonic()
        sim = _open_simulation(self.config, settings)
        boot_error: UmttError | None = None
        try:
            _factory(self.config, sim, settings)(
                "kunit", cmdline=["kunit.enable=1", f"kunit.filter_glob={glob}"])
        except UmttError as exc:  # a case may crash the kernel: report it, run the rest
            boot_error = exc
        finally:
            machine = sim.machines.get("kunit")
            console = machine.console if machine else None
            text = console.text if console else ""
            tail = machine.console_tail() if machine else ""
            _close_simulation(self.config, sim, started, None)
        items: list[pytest.Item] = [
            KunitCase.from_parent(self, name=case.name, case=case, detail=(
                _crash_console(console, case) if case.crashed else ""))
            for case in parse_ktap(text)]
        if boot_error is not None:
            items.append(KunitCase.from_parent(self, name="boot", case=None, detail=(
                f"the KUnit machine did not come up: {boot_error}")))
        elif not items:
            items.append(KunitCase.from_parent(self, name="no-cases", case=None, detail=(
                f"no KUnit test case matched {glob!r} (is the suite built in?)\n{tail}")))
        return items


def _crash_console(console: Console | None, case: KtapCase) -> str:
    """The console from a crashed case on, each line with its virtual time."""
    if console is None:
        return ""
    shown = console.lines[case.lines.start:case.lines.start + CONSOLE_TAIL]
    return "console from the crash on:\n" + "\n".join(str(line) for line in shown)


class KunitCase(pytest.Item):
    """One KUnit test case's result, as the kernel reported it."""

    def __init__(self, *, case: KtapCase | None, detail: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.case = case
        self.detail = detail

    def runtest(self) -> None:
        if self.case is None:
            raise KunitFailure(self.detail)
        if self.case.skipped:
            pytest.skip(self.case.reason or "skipped by KUnit")
        if not self.case.ok:
            raise KunitFailure("\n".join([*self.case.diagnostics, self.detail]).strip()
                               or "not ok")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, KunitFailure):
            how = "crashed" if self.case is not None and self.case.crashed else "failed"
            return f"KUnit: {self.name} {how}\n{excinfo.value}"
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"kunit: {self.name}"


class KselftestFailure(Exception):
    """A kselftest failed, crashed its kernel, or outran a budget."""


class KselftestRun(pytest.Collector):
    """An installed kselftest tree: each test runs in a fresh machine (a crash, a hang or
    a changed clock cannot touch the next test, and a test's run does not depend on
    which others ran); one item per test and one per KTAP subtest it printed."""

    def collect(self) -> list[pytest.Item]:
        settings = self.config.stash[STATE].settings
        assert settings.kselftest is not None
        items: list[pytest.Item] = []
        for test in read_tests(settings.kselftest):
            result = self._run(settings, settings.kselftest, test)
            items.append(KselftestItem.from_parent(self, name=test.id, result=result))
            items += [KselftestItem.from_parent(self, name=f"{test.id}/{case.name}",
                                                result=result, case=case)
                      for case in result.cases]
        return items

    def _run(self, settings: Settings, root: Path, test: KselftestTest) -> KselftestResult:
        started = time.monotonic()
        sim = _open_simulation(self.config, settings)
        try:
            machine = _factory(self.config, sim, settings)("kselftest")
            return run_kselftest(machine, test, tree=machine.push(root, GUEST_TREE),
                                 timeout=virtual_budget(root, test, settings.kselftest_timeout),
                                 wall_timeout=settings.kselftest_wall_timeout)
        except UmttError as exc:  # the machine did not come up: report it, run the rest
            return KselftestResult(test, Outcome.CRASH, f"the machine did not come up: {exc}",
                                   wall_seconds=time.monotonic() - started)
        finally:
            _close_simulation(self.config, sim, started,
                              _artifacts_dir(settings, f"kselftest/{test.id}"))


class KselftestItem(pytest.Item):
    """A kselftest's result (or one of its KTAP subtests'), as the run reported it."""

    def __init__(self, *, result: KselftestResult, case: KtapCase | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.result = result
        self.case = case
        if case is None:
            self.user_properties += [
                ("umtt_virtual_seconds", f"{result.virtual_ns / 1e9:.9f}"),
                ("umtt_wall_seconds", f"{result.wall_seconds:.3f}")]

    def runtest(self) -> None:
        if self.case is not None:
            if self.case.skipped:
                pytest.skip(self.case.reason or "skipped (KTAP)")
            if not self.case.ok:
                raise KselftestFailure("\n".join(self.case.diagnostics) or "not ok")
            return
        if self.result.outcome is Outcome.SKIP:
            pytest.skip(self.result.detail)
        if self.result.outcome is not Outcome.PASS:
            raise KselftestFailure(self._failure_text())

    def _failure_text(self) -> str:
        result = self.result
        lines = result.output.splitlines()[-CONSOLE_TAIL:]
        return (f"{result.outcome.value}: {result.detail}\n"
                f"({result.virtual_ns / 1e9:.3f} s virtual, {result.wall_seconds:.1f} s wall)"
                + (f"\n--- output (last {len(lines)} lines) ---\n" + "\n".join(lines)
                   if lines else "\n(no output)"))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, KselftestFailure):
            return f"kselftest {self.name}: {excinfo.value}"
        return str(super().repr_failure(excinfo, style))

    def reportinfo(self) -> tuple[Path, None, str]:
        return self.path, None, f"kselftest: {self.name}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """--umtt-explore and --umtt-check-determinism: one item per seed and per run."""
    settings = metafunc.config.stash[STATE].settings
    if "umtt_sim" not in metafunc.fixturenames:
        return
    variants = [Variant(seed=settings.seed + n) for n in range(settings.explore)] or [Variant()]
    if settings.check_determinism:
        variants = [replace(v, run=run) for v in variants for run in (1, 2)]
    if variants != [Variant()]:
        metafunc.parametrize("umtt_variant", variants, ids=[v.id for v in variants])


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[STATE]
    settings = state.settings
    if settings.kernel is None:
        kernel = "none (build one with `umtt-kernel build` or pass --uml-kernel)"
    else:
        identity = kernel_identity(settings.kernel)
        kernel = f"{settings.kernel}\n      {identity}"
        if not identity.pinned:
            kernel += "\n      (version string not pinned: a rebuild changes seeded runs)"
    shim = build_shim()
    entropy = ("seeded by the getrandom shim" if shim is not None else
               "NOT deterministic: no C compiler to build the getrandom shim")
    return [f"umtt: kernel {kernel}", f"umtt: guest root {_root_description(state)}",
            f"umtt: seed {settings.seed} ({settings.seed_source}), guest entropy {entropy}"]


def _root_description(state: SessionState) -> str:
    try:
        rootfs = state.guest_root()
    except KernelError as exc:
        return f"pinned, but it cannot be built: {exc}"
    if rootfs is None:
        return "the host's / through hostfs (runs depend on the host's userspace)"
    return f"{rootfs.identity} ({len(rootfs.packages)} Debian packages, {rootfs.image})"


# --- fixtures -----------------------------------------------------------------------

def _settings_of(item: pytest.Item) -> Settings:
    """A test's settings: its markers applied at collection, else the session's."""
    return item.stash.get(ITEM_SETTINGS, item.config.stash[STATE].settings)


def _open_simulation(config: pytest.Config, settings: Settings) -> Simulation:
    sim = Simulation(kernel=settings.kernel, seed=settings.seed,
                     stall_timeout=settings.wall_timeout, perturb=settings.perturb,
                     rootfs=config.stash[STATE].guest_root())
    sim.on_doorbell.append(
        lambda machine, value: config.hook.pytest_umtt_doorbell(machine=machine, value=value))
    config.stash[STATE].open.add(sim)
    return sim


def _close_simulation(config: pytest.Config, sim: Simulation, started: float,
                      artifacts: Path | None) -> None:
    state = config.stash[STATE]
    state.open.discard(sim)
    state.summary.add_simulation(sim.now, time.monotonic() - started)
    sim.close(keep_files=artifacts is not None)
    if artifacts is not None:
        try:
            save_artifacts(sim, artifacts)
        finally:
            shutil.rmtree(sim.directory, ignore_errors=True)


def _factory(config: pytest.Config, sim: Simulation, settings: Settings) -> MachineFactory:
    def make(name: str | None = None, *, boot: bool = True, mem: str | None = None,
             cmdline: Sequence[str] = ()) -> Machine:
        name = name or f"m{len(sim.machines) + 1}"
        hooked = [arg for args in config.hook.pytest_umtt_kernel_cmdline(name=name) or []
                  for arg in args or []]
        return sim.machine(name, boot=boot, kernel=settings.kernel, mem=mem or settings.mem,
                           cmdline=[*settings.cmdline, *hooked, *cmdline],
                           default_timeout=settings.virtual_timeout)
    return make


def _artifacts_dir(settings: Settings, nodeid: str) -> Path | None:
    if settings.artifacts is None:
        return None
    return settings.artifacts / re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")


@pytest.fixture
def umtt_variant(request: pytest.FixtureRequest) -> Variant:
    """The seed or run this item stands for (``--umtt-explore``,
    ``--umtt-check-determinism``); an empty Variant otherwise."""
    return getattr(request, "param", Variant())


@pytest.fixture
def umtt_sim(request: pytest.FixtureRequest, umtt_variant: Variant) -> Iterator[Simulation]:
    """This test's simulation: the virtual clock (``now``, ``advance``, ``run_until``,
    ``elapsed``) shared by all of its machines."""
    item = request.node
    settings = _settings_of(item)
    if umtt_variant.seed is not None:
        settings = replace(settings, seed=umtt_variant.seed, seed_source="--umtt-explore")
    item.stash[ITEM_SETTINGS] = settings
    item.user_properties.append(("umtt_seed", str(settings.seed)))
    if umtt_variant.seed is not None:
        item.user_properties.append((EXPLORED_SEED, str(umtt_variant.seed)))
    started = time.monotonic()
    sim = _open_simulation(request.config, settings)
    item.stash[ITEM_SIM] = sim
    try:
        yield sim
    finally:
        item.user_properties.append(("umtt_virtual_seconds", f"{sim.seconds:.9f}"))
        _close_simulation(request.config, sim, started, _artifacts_dir(settings, item.nodeid))
    if umtt_variant.run is not None:
        fingerprint = sim.fingerprint()
        # The summary pairs the runs by this digest, wherever (which xdist worker) each ran.
        item.user_properties.append(
            (FINGERPRINT, hashlib.sha256("\n".join(fingerprint).encode()).hexdigest()))
        _compare_runs(request.config.stash[STATE], item.nodeid, fingerprint)


def _compare_runs(state: SessionState, nodeid: str, fingerprint: list[str]) -> None:
    """The second of two runs with one seed in this process: it must be the first one
    again, or this item fails and shows where they part."""
    key = re.sub(r"determinism-[12]", "determinism", nodeid)
    first = state.first_runs.pop(key, None)
    if first is None:
        state.first_runs[key] = fingerprint
        return
    difference = first_difference(first, fingerprint)
    if difference is not None:
        raise AssertionError(f"not deterministic: two runs with one seed differ; {difference}")


@pytest.fixture
def uml_factory(request: pytest.FixtureRequest, umtt_sim: Simulation) -> MachineFactory:
    """Make more machines on this test's clock: ``uml_factory("name", mem="256M")``.
    Pass ``boot=False`` to several and ``umtt_sim.boot(*machines)`` to boot them together."""
    return _factory(request.config, umtt_sim, _settings_of(request.node))


@pytest.fixture
def uml(uml_factory: MachineFactory) -> Machine:
    """One booted UML machine, named ``uml``."""
    return uml_factory("uml")


@pytest.fixture(scope="module")
def umtt_module_sim(request: pytest.FixtureRequest) -> Iterator[Simulation]:
    """A simulation shared by every test of a module (boot once, run many)."""
    settings = request.config.stash[STATE].settings
    started = time.monotonic()
    sim = _open_simulation(request.config, settings)
    try:
        yield sim
    finally:
        _close_simulation(request.config, sim, started,
                          _artifacts_dir(settings, request.node.nodeid))


@pytest.fixture(scope="module")
def uml_module(request: pytest.FixtureRequest, umtt_module_sim: Simulation) -> Machine:
    """One machine booted once for the whole module."""
    settings = request.config.stash[STATE].settings
    return _factory(request.config, umtt_module_sim, settings)("uml")


# --- reports ------------------------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    sim = item.stash.get(ITEM_SIM, None)
    if sim is not None and report.failed and report.when != "teardown":
        _add_failure_sections(item, sim, report)
    return report


def _add_failure_sections(item: pytest.Item, sim: Simulation, report: pytest.TestReport) -> None:
    for name, machine in sim.machines.items():
        report.sections.append((f"umtt console: {name} ({machine.console_log()})",
                                machine.console_tail(CONSOLE_TAIL)))
    if sim.calendar.trace is not None:
        events = sim.calendar.trace.events[-PROTOCOL_TAIL:]
        report.sections.append(("umtt protocol (last events)", "\n".join(
            f"{format_ns(e.now)} {e.kind:5} {e.client} {e.op}({e.time}) {e.detail}".rstrip()
            for e in events)))
    settings = _settings_of(item)
    report.sections.append(("umtt reproduce", reproduce_text(item.nodeid, settings, sim)))


def reproduce_text(nodeid: str, settings: Settings, sim: Simulation | None = None) -> str:
    """The seed, a command that reruns this test the same way, and what the run's
    outcome depends on besides the seed: the kernel and the guest root, exactly."""
    command = f"pytest {shlex.quote(base_nodeid(nodeid))} --umtt-seed={settings.seed}"
    if settings.kernel is not None:
        command += f" --uml-kernel={shlex.quote(str(settings.kernel))}"
    if settings.rootfs != "pinned":
        command += f" --umtt-rootfs={settings.rootfs}"
    lines = [f"seed {settings.seed} ({settings.seed_source}); to reproduce:", f"  {command}"]
    if sim is not None:
        lines += [f"same run where {sim.identity(machine)}" for machine in
                  list(sim.machines.values())[:1]]
    artifacts = _artifacts_dir(settings, nodeid)
    if artifacts is not None:
        lines.append(f"artifacts: {artifacts}")
    return "\n".join(lines)


def save_artifacts(sim: Simulation, target: Path) -> None:
    """Consoles, command records and the protocol trace of a finished simulation."""
    target.mkdir(parents=True, exist_ok=True)
    for name, machine in sim.machines.items():
        if machine.console is not None and machine.console.log_path.exists():
            shutil.copyfile(machine.console.log_path, target / f"{name}.console.log")
        commands = machine.directory / "cmd"
        if commands.is_dir():
            # Links the guest made stay links: never copy what they point to.
            shutil.copytree(commands, target / f"{name}.commands", symlinks=True,
                            dirs_exist_ok=True)
    trace = sim.calendar.trace
    if trace is not None:
        with (target / "trace.jsonl").open("w") as stream:
            trace.write_jsonl(stream)
        for name in sim.machines:
            with (target / f"{name}.trace.jsonl").open("w") as stream:
                trace.write_jsonl(stream, client=name)
    (target / "simulation.json").write_text(json.dumps(
        {"seed": sim.seed, "virtual_ns": sim.now,
         "machines": {name: sim.identity(machine) for name, machine in sim.machines.items()}},
        indent=2))
