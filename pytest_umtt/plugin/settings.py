"""Settings: every option once as CLI, env and ini, resolved in one place; markers."""

from __future__ import annotations

import math
import os
import random
import re
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from .. import kselftest
from ..cache import cache_root, writable_dir
from ..coverage import CoverageError, ensure_lcov
from ..errors import KernelError
from ..kconfig import DEFAULT_CONFIG, KernelConfig, parse_spec
from ..kernel import build_kernel, debian_source, default_kernel
from ..kselftest import (
    LIST_FILE,
)
from ..placement import CpuSetting, PlacementError, check_cpu
from ..simulation import (
    DEFAULT_WALL_TIMEOUT,
)
from ..uml.machine import DEFAULT_COMMAND_TIMEOUT, DEFAULT_MEM
from ..units import MAX_SECONDS
from .names import MARKER_RENAMES, warn_renamed

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
    wall_timeout: float = DEFAULT_WALL_TIMEOUT
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
    bundle: str = "never"
    replay: Path | None = None
    confine: bool = True
    kconfig: KernelConfig = DEFAULT_CONFIG
    allow_splat: tuple[SplatAllowance, ...] = ()
    shrink: bool = False
    schedule: Path | None = None
    explore_json: Path | None = None
    debug_kernel: bool = False
    coverage: tuple[str, ...] | None = None
    """Kernel source directories whose coverage the session reports (``("",)``: the whole
    kernel); None: no coverage."""
    coverage_per_test: bool = False
    """Also each test's own counts and report (``--umtt-coverage-per-test``)."""
    cpu: CpuSetting = "auto"
    """The host CPU each simulation runs on (:mod:`pytest_umtt.placement`)."""


@dataclass(frozen=True)
class SplatAllowance:
    """A kernel splat a test, or every test, lets pass: ``pattern`` is searched in the
    splat's kind, its first line and its signature; ``reason`` says why it may pass,
    ``where`` who said so."""

    pattern: re.Pattern[str]
    reason: str
    where: str

    def allows(self, kind: str, header: str, signature: str) -> bool:
        return any(self.pattern.search(text) for text in (kind, header, signature))


@dataclass(frozen=True)
class Option:
    """One setting: its ini key (the CLI flag and env variable derive from it), its help,
    and the Settings field it fills with what ``parse(text, where)`` makes of it, or with
    ``default``."""

    name: str
    flag: str
    help: str
    metavar: str | None  # None: an on/off switch
    field: str
    parse: Callable[[str, str], Any]
    default: Any
    repeated: bool = False
    """Given any number of times (the CLI flag repeated, one per ini line, one per line
    of the environment variable); ``parse`` gets them one per line."""
    const: str | None = None
    """What the CLI flag means without a value (None: it needs one)."""

    @property
    def env(self) -> str:
        return self.name.upper()


ROOTFS_CHOICES = ("pinned", "host")


def _raw_setting(config: pytest.Config, option: Option) -> tuple[str, str] | None:
    """The first of CLI, environment and ini that sets ``option``, with where it came from."""
    cli = config.getoption(option.name)
    if cli is not None:
        return ("\n".join(cli) if option.repeated else str(cli)), option.flag
    if option.env in os.environ:
        return os.environ[option.env], f"${option.env}"
    ini = config.getini(option.name)
    if ini:
        return ("\n".join(ini) if option.repeated else str(ini)), f"ini {option.name}"
    return None


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


def _on_off(text: str, where: str) -> bool:
    if text.lower() not in ("on", "off"):
        raise pytest.UsageError(f"{where}: expected on or off, got {text!r}")
    return text.lower() == "on"


def _count(text: str, where: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise pytest.UsageError(f"{where}: expected a number of seeds (1 or more), got {text!r}")
    return int(text)


def _one_of(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    """A parser that takes one of ``choices`` and names them all otherwise."""
    def parse(text: str, where: str) -> str:
        if text not in choices:
            raise pytest.UsageError(f"{where}: expected one of {', '.join(choices)}, "
                                    f"got {text!r}")
        return text
    return parse


def _cpu(text: str, where: str) -> CpuSetting:
    """``auto``, ``off`` or a CPU this process may use."""
    if text in ("auto", "off"):
        return None if text == "off" else "auto"
    try:
        return check_cpu(int(text))
    except ValueError as exc:  # not a number, or a PlacementError
        detail = str(exc) if isinstance(exc, PlacementError) else f"got {text!r}"
        raise pytest.UsageError(f"{where}: expected auto, off or a CPU number: {detail}") \
            from None


def _kernel(text: str, where: str) -> Path:
    # Absolute: UML starts in its machine's directory, where a relative name means nothing.
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise pytest.UsageError(f"{where}: no kernel at {text!r}")
    return path


def _kconfig(text: str, where: str) -> KernelConfig:
    try:
        return parse_spec(text, where)
    except KernelError as exc:
        raise pytest.UsageError(str(exc)) from None


def built_variant(config: KernelConfig, where: str) -> Path:
    """The kernel built from Debian's source with ``config`` beside pytest-umtt's fragment
    (built now if it is not in the cache yet, as kunit.py builds before it runs)."""
    def say(text: str) -> None:
        print(f"umtt-kernel: {text}", file=sys.stderr, flush=True)
    try:
        source = debian_source(writable_dir(cache_root()), say)
        return build_kernel(source, config=config, say=say)
    except KernelError as exc:
        raise pytest.UsageError(f"{where}: kernel {config.describe()}: {exc}") from None


def _marker_kernel(value: object, where: str) -> Path:
    """``umtt_machine(kernel=...)``: a kernel binary's path, or a KernelConfig (its variant)."""
    if isinstance(value, KernelConfig):
        return built_variant(value, where)
    return _kernel(str(value), where)


def _kselftest_tree(text: str, where: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not (path / LIST_FILE).is_file():
        raise pytest.UsageError(f"{where}: {text!r} is not an installed kselftest tree (no "
                                f"{LIST_FILE}); make one with `umtt-kselftest build "
                                f"--targets TARGET` or `make -C tools/testing/selftests "
                                f"TARGETS=... install INSTALL_PATH=DIR`")
    return path


BUNDLE_CHOICES = ("always", "failed", "never")


def _bundle_file(text: str, where: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise pytest.UsageError(f"{where}: no replay bundle at {text!r}")
    return path


def _splat_pattern(pattern: object, where: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise pytest.UsageError(f"{where}: expected a regular expression as a string, "
                                f"got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise pytest.UsageError(f"{where}: {pattern!r} is not a regular expression "
                                f"({exc})") from None


def _allowances(text: str, where: str) -> tuple[SplatAllowance, ...]:
    """One splat pattern per line; the option itself is the reason (whoever runs the
    suite with it vouches for it)."""
    return tuple(SplatAllowance(_splat_pattern(line, where), f"allowed by {where}", where)
                 for line in text.splitlines() if line.strip())


def _path(text: str, _where: str) -> Path:
    return Path(text)


def _existing_file(text: str, where: str) -> Path:
    path = Path(text).expanduser().absolute()
    if not path.is_file():
        raise pytest.UsageError(f"{where}: no file at {text!r}")
    return path


def _text(text: str, _where: str) -> str:
    return text


def _source_directories(text: str, where: str) -> tuple[str, ...]:
    """Comma-separated directories of the kernel's source (``drivers/gpio/``), each
    normalised to end in ``/``; ``.`` or nothing is the whole kernel (``""``)."""
    found = []
    for word in (part.strip() for part in text.split(",")):
        path = Path(word or ".")
        if path.is_absolute() or ".." in path.parts:
            raise pytest.UsageError(f"{where}: {word!r} is not a directory of the kernel's "
                                    f"source (expected a relative path like drivers/gpio/)")
        found.append("" if str(path) == "." else f"{path}/")
    return tuple(dict.fromkeys(found))


OPTIONS = (
    Option("umtt_kernel", "--uml-kernel", "UML kernel with time-travel support "
           "(default: the one `umtt-kernel build` made)", "PATH",
           "kernel", _kernel, None),
    Option("umtt_seed", "--umtt-seed", "seed of every simulation: an integer, or 'random' "
           "(default 0: plain runs are reproducible)", "N",
           "seed", _seed, (0, "default")),
    Option("umtt_mem", "--umtt-mem",
           f"memory of each machine, e.g. 512M (default {DEFAULT_MEM})", "SIZE",
           "mem", _mem, DEFAULT_MEM),
    Option("umtt_cmdline", "--umtt-cmdline", "extra kernel command-line arguments for every "
           "machine (shell quoting)", "ARGS",
           "cmdline", _arguments, ()),
    Option("umtt_virtual_timeout", "--umtt-virtual-timeout", "virtual seconds a command may "
           f"take when the test gives no timeout (default {DEFAULT_COMMAND_TIMEOUT:g})",
           "SECONDS",
           "virtual_timeout", _positive_float, DEFAULT_COMMAND_TIMEOUT),
    Option("umtt_wall_timeout", "--umtt-wall-timeout", "wall seconds virtual time may stand "
           f"still before a machine counts as hung (default {DEFAULT_WALL_TIMEOUT:g})",
           "SECONDS",
           "wall_timeout", _positive_float, DEFAULT_WALL_TIMEOUT),
    Option("umtt_artifacts", "--umtt-artifacts", "directory for per-test artifacts: consoles, "
           "commands, protocol trace (default: none kept)", "DIR",
           "artifacts", _path, None),
    Option("umtt_kunit", "--umtt-kunit", "run the kernel's KUnit suites matching GLOB at boot "
           "and report each test case as a test", "GLOB",
           "kunit", _text, None),
    Option("umtt_explore", "--umtt-explore", "run each test with K seeds (the seed, seed+1, "
           "...) and report which seeds failed", "K",
           "explore", _count, 0),
    Option("umtt_check_determinism", "--umtt-check-determinism", "run each test twice with "
           "one seed and fail if the runs differ (protocol, console, results)", None,
           "check_determinism", _switch, False),
    Option("umtt_perturb", "--umtt-perturb", "seeded perturbation of the order of events at "
           "the same virtual instant, to shake out races between machines", None,
           "perturb", _switch, False),
    Option("umtt_rootfs", "--umtt-rootfs", "the guest's root filesystem: 'pinned' (default; "
           "built from Debian packages, the same on every host) or 'host' (the host's / "
           "read-only through hostfs)", "pinned|host",
           "rootfs", _one_of(ROOTFS_CHOICES), "pinned"),
    Option("umtt_kselftest", "--umtt-kselftest", "run the installed kselftest tree DIR "
           "(`make -C tools/testing/selftests install INSTALL_PATH=DIR`, or `umtt-kselftest "
           "build`), each test in a fresh machine; each test and KTAP subtest a test", "DIR",
           "kselftest", _kselftest_tree, None),
    Option("umtt_kselftest_timeout", "--umtt-kselftest-timeout", "virtual seconds each "
           "kselftest may take, overriding its collection's settings file (default: that "
           f"file's timeout, else kselftest's {KSELFTEST_TIMEOUT:g})", "SECONDS",
           "kselftest_timeout", _positive_float, None),
    Option("umtt_kselftest_wall_timeout", "--umtt-kselftest-wall-timeout", "wall seconds "
           "each kselftest may take before it is stopped and diagnosed (default "
           f"{KSELFTEST_WALL_TIMEOUT:g}; UML runs clock-polling loops about 100x "
           "slower than real time)", "SECONDS",
           "kselftest_wall_timeout", _positive_float, KSELFTEST_WALL_TIMEOUT),
    Option("umtt_bundle", "--umtt-bundle", "write a replay bundle (kernel, root, seed, "
           "settings and test files in one file) into the artifacts directory for "
           "tests that failed, for every test, or never (default: failed with "
           "--umtt-artifacts, else never)", "always|failed|never",
           "bundle", _one_of(BUNDLE_CHOICES), None),
    Option("umtt_replay", "--umtt-replay", "run the test of a replay bundle with the "
           "bundle's kernel, root, shim, seed and settings, and say whether the run is the "
           "same", "BUNDLE",
           "replay", _bundle_file, None),
    Option("umtt_kconfig", "--umtt-kconfig", "kernel config beside pytest-umtt's fragment, as "
           "shell words: fragment FILEs, kunit:FILE (a .kunitconfig), kselftest:TARGET (its "
           "config), CONFIG_X=VALUE; the variant is built once and cached (umtt-kernel build "
           "takes the same as flags). Ignored with --uml-kernel", "SPEC",
           "kconfig", _kconfig, DEFAULT_CONFIG),
    Option("umtt_confine", "--umtt-confine", "confine each machine to its own directory "
           "(private mount namespace, the host read-only): 'on' (default; a host that "
           "refuses the namespaces is an error) or 'off' (the guest can write what the user "
           "running pytest can write)", "on|off",
           "confine", _on_off, True),
    Option("umtt_cpu", "--umtt-cpu", "the host CPU each simulation's kernels and calendar "
           "share: 'auto' (default: the CPU pytest runs on; pytest-xdist workers no more "
           "numerous than the CPUs take one each), a CPU number (with -n: worker 0's, the "
           "others count on from it), or 'off' (the host scheduler spreads them; slower: "
           "every hand-over then wakes a process on another CPU)", "auto|off|N",
           "cpu", _cpu, "auto"),
    Option("umtt_shrink", "--umtt-shrink", "for a test that fails with perturbed decisions "
           "(--umtt-perturb's tie orders and doorbell delays, a seeded network's losses and "
           "reorderings): rerun it to find the fewest decisions that still fail it, print "
           "that schedule and write it for --umtt-schedule", None,
           "shrink", _switch, False),
    Option("umtt_schedule", "--umtt-schedule", "replay a schedule that --umtt-shrink wrote: "
           "its test runs with its seed and only its decisions perturbed", "FILE",
           "schedule", _existing_file, None),
    Option("umtt_explore_json", "--umtt-explore-json", "write the --umtt-explore summary "
           "(rates, 95% intervals, seeds by failure signature) as JSON to FILE (default: "
           "explore.json in --umtt-artifacts, if given)", "FILE",
           "explore_json", _path, None),
    Option("umtt_allow_splat", "--umtt-allow-splat", "let kernel splats (WARNING, lockdep, "
           "KASAN...) whose kind, first line or signature matches the regular expression "
           "PATTERN pass every test; repeat for more (default: every splat fails its test)",
           "PATTERN",
           "allow_splat", _allowances, (), repeated=True),
    Option("umtt_debug_kernel", "--umtt-debug-kernel", "run on the sanitizer kernel: KASAN, "
           "UBSAN, lockdep and DEBUG_OBJECTS over the kernel --umtt-kconfig names (umtt-kernel "
           "build --debug; built once and cached); their reports fail the tests they appear "
           "in", None,
           "debug_kernel", _switch, False),
    Option("umtt_coverage", "--umtt-coverage", "run on the coverage kernel (gcov; umtt-kernel "
           "build --coverage) and write the kernel code the session's tests ran as an lcov "
           "report: HTML and one summary line per directory in DIRS (comma-separated kernel "
           "source directories, e.g. drivers/gpio/; default: the whole kernel). Needs lcov",
           "DIRS",
           "coverage", _source_directories, None, const="."),
    Option("umtt_coverage_per_test", "--umtt-coverage-per-test", "with --umtt-coverage, "
           "also each test's own lcov tracefile and summary lines (tests/ in the coverage "
           "directory; a module's shared machines count for the module)", None,
           "coverage_per_test", _switch, False),
)


def resolve_settings(config: pytest.Config) -> Settings:
    """Settings from CLI > environment > ini; bad values are a UsageError naming the fix."""
    values: dict[str, Any] = {}
    for option in OPTIONS:
        found = _raw_setting(config, option)
        values[option.field] = option.default if found is None else option.parse(*found)
    values["seed"], values["seed_source"] = values["seed"]
    if values["coverage_per_test"] and values["coverage"] is None:
        raise pytest.UsageError("--umtt-coverage-per-test splits --umtt-coverage's counts "
                                "by test: give --umtt-coverage too")
    values["kconfig"] = _own_variants(values)
    if values["kernel"] is None and not values["kconfig"].empty:
        values["kernel"] = built_variant(values["kconfig"], "--umtt-kconfig")
    values["kernel"] = values["kernel"] or default_kernel()
    if values["bundle"] is None:
        values["bundle"] = "never" if values["artifacts"] is None else "failed"
    elif values["bundle"] != "never" and values["artifacts"] is None:
        raise pytest.UsageError(f"--umtt-bundle={values['bundle']} needs --umtt-artifacts=DIR "
                                f"(bundles are written there)")
    return Settings(**values)


def _own_variants(values: dict[str, Any]) -> KernelConfig:
    """--umtt-kconfig's config with the sanitizers and coverage asked for; those build a
    kernel of their own, so a given kernel binary cannot go with them."""
    config: KernelConfig = values["kconfig"]
    debug, coverage = bool(values["debug_kernel"]), values["coverage"] is not None
    if not (debug or coverage):
        return config
    if coverage:
        try:
            ensure_lcov()  # before a kernel is built for it, not after the session
        except CoverageError as exc:
            raise pytest.UsageError(str(exc)) from None
    if values["kernel"] is not None:
        flag = "--umtt-debug-kernel" if debug else "--umtt-coverage"
        raise pytest.UsageError(f"{flag} builds its own kernel: it cannot run on the kernel "
                                f"--uml-kernel gives ({values['kernel']}); leave one out")
    return replace(config, debug=debug, coverage=coverage)


# --- markers ------------------------------------------------------------------------

MARKERS = {
    "umtt_machine": "umtt_machine(mem=None, cmdline=None, kernel=None): options for this "
                    "test's machines (kernel: a binary's path, or a pytest_umtt.KernelConfig: "
                    "that variant, built once)",
    "umtt_virtual_timeout": "umtt_virtual_timeout(seconds): virtual-time budget of each "
                            "command",
    "umtt_wall_timeout": "umtt_wall_timeout(seconds): wall seconds virtual time may stand "
                         "still",
    "umtt_seed": "umtt_seed(n): this test's simulation seed",
    "umtt_allow_splat": "umtt_allow_splat(pattern, reason): let kernel splats whose kind, "
                        "first line or signature matches the regular expression pattern "
                        "pass this test, for the reason given",
} | {old: f"{old}: deprecated, use {new}" for old, new in MARKER_RENAMES.items()}
_MARKER_ARGS = {"umtt_machine": ((), {"mem", "cmdline", "kernel"}),
                "umtt_virtual_timeout": (("seconds",), set()),
                "umtt_wall_timeout": (("seconds",), set()),
                "umtt_seed": (("n",), set())}
_OLD_MARKER = {new: old for old, new in MARKER_RENAMES.items()}


def _closest_marker(item: pytest.Item, name: str) -> tuple[pytest.Mark, str] | None:
    """The marker ``name``, or the older name it replaced (which warns once)."""
    marker = item.get_closest_marker(name)
    if marker is not None:
        return marker, name
    old = _OLD_MARKER.get(name)
    marker = None if old is None else item.get_closest_marker(old)
    if marker is None or old is None:
        return None
    warn_renamed(item.config, "marker", old, item)
    return marker, old


def _marker_values(item: pytest.Item, name: str) -> dict[str, Any] | None:
    found = _closest_marker(item, name)
    if found is None:
        return None
    marker, spelled = found
    positional, keywords = _MARKER_ARGS[name]
    signature = MARKERS[name].split(":")[0].removeprefix(name)
    where = f"{item.nodeid}: @pytest.mark.{spelled}{signature}"
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
    if (uml := _marker_values(item, "umtt_machine")) is not None:
        cmdline = _arguments(uml["cmdline"], where) if "cmdline" in uml else ()
        settings = replace(
            settings,
            mem=_mem(uml["mem"], where) if "mem" in uml else settings.mem,
            cmdline=settings.cmdline + cmdline,
            kernel=_marker_kernel(uml["kernel"], where) if uml.get("kernel") else settings.kernel)
    if (value := _marker_values(item, "umtt_virtual_timeout")) is not None:
        settings = replace(settings,
                           virtual_timeout=_positive_float(str(value["seconds"]), where))
    if (value := _marker_values(item, "umtt_wall_timeout")) is not None:
        settings = replace(settings, wall_timeout=_positive_float(str(value["seconds"]), where))
    if (value := _marker_values(item, "umtt_seed")) is not None:
        seed, source = _seed(str(value["n"]), where)
        settings = replace(settings, seed=seed, seed_source=source)
    allowed = _marked_allowances(item)
    return replace(settings, allow_splat=settings.allow_splat + allowed) if allowed else settings


def _marked_allowances(item: pytest.Item) -> tuple[SplatAllowance, ...]:
    """Every ``umtt_allow_splat`` marker on the test, its class and its module; each
    needs a pattern and a reason."""
    allowed = []
    for marker in item.iter_markers("umtt_allow_splat"):
        where = f"{item.nodeid}: @pytest.mark.umtt_allow_splat"
        values = dict(zip(("pattern", "reason"), marker.args, strict=False))
        if len(marker.args) > 2 or set(marker.kwargs) - {"pattern", "reason"} or (
                set(values) & set(marker.kwargs)):
            raise pytest.UsageError(f"{where} got {marker.args} {marker.kwargs}; expected "
                                    f"(pattern, reason=...)")
        values.update(marker.kwargs)
        reason = values.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            raise pytest.UsageError(f"{where}({values.get('pattern')!r}) needs a reason: "
                                    f"reason=\"why this splat may pass\"")
        allowed.append(SplatAllowance(_splat_pattern(values.get("pattern"), where), reason,
                                      f"@pytest.mark.umtt_allow_splat on {item.nodeid}"))
    return tuple(allowed)
