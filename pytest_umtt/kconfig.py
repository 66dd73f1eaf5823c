"""Kernel configuration: pytest-umtt's fragment, and what a user adds to it.

A kernel is ARCH=um defconfig, then pytest-umtt's fragment (``data/umtt.config``: time
travel, the devices, the agent's console), then whatever the user asks for, in order:
config fragments (``--kconfig FILE``), KUnit's ``.kunitconfig`` files (``--kunitconfig``),
a kselftest target's own ``config`` (``--kselftest-config TARGET``), single options
(``--kconfig-add CONFIG_X=y``); later settings win. pytest-umtt's own variants come
first of these: the sanitizer kernel (``--debug``, ``data/debug.config``) and the coverage
kernel (``--coverage``, ``data/coverage.config``). What time travel needs
(:data:`REQUIRED`) wins over everything: a request that contradicts it is an error naming
the option and where it came from. The merged text is what names the kernel in the
cache, so each combination is built once.
"""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import KernelError

OPTION_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
UNSET_LINE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")

REQUIRED = {
    "CONFIG_UML_TIME_TRAVEL_SUPPORT": ("y", "time-travel=ext needs it"),
    "CONFIG_SMP": ("n", "time-travel=ext requires a uniprocessor kernel"),
    "CONFIG_UML_RANDOM": ("n", "host entropy would make runs differ for one seed"),
    "CONFIG_HOSTFS": ("y", "each machine's directory reaches the guest through hostfs"),
    "CONFIG_BLK_DEV_INITRD": ("y", "the pinned guest root is an initramfs"),
    "CONFIG_VIRTIO_UML": ("y", "device models and the agent's console are vhost-user devices"),
}
"""What pytest-umtt's machines cannot work without, and why."""


def fragment_text() -> str:
    """The config fragment shipped with the package."""
    return resources.files("pytest_umtt").joinpath("data/umtt.config").read_text()


VARIANT_FRAGMENTS = {"debug": "data/debug.config", "coverage": "data/coverage.config"}
"""pytest-umtt's own variants: what ``KernelConfig(debug=True)`` and ``coverage=True`` add."""


def variant_text(name: str) -> str:
    """The fragment of one of pytest-umtt's own variants (:data:`VARIANT_FRAGMENTS`)."""
    return resources.files("pytest_umtt").joinpath(VARIANT_FRAGMENTS[name]).read_text()


def fragment_options(text: str) -> dict[str, str]:
    """``{"CONFIG_X": "y", "CONFIG_Y": "n", ...}`` from a fragment (``is not set`` = n);
    a later line for one option wins."""
    options = {}
    for raw in text.splitlines():
        parsed = _parse_line(raw.strip())
        if parsed is not None:
            options[parsed[0]] = parsed[1]
    return options


def _parse_line(line: str) -> tuple[str, str] | None:
    if found := UNSET_LINE.match(line):
        return found.group(1), "n"
    if found := OPTION_LINE.match(line):
        return found.group(1), found.group(2)
    return None


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """What a user asks of a kernel beside pytest-umtt's fragment (empty: the default
    kernel). Paths are taken as given; a kselftest target names a directory under the
    source tree's tools/testing/selftests."""

    fragments: tuple[Path, ...] = ()
    kunitconfigs: tuple[Path, ...] = ()
    kselftest_targets: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    debug: bool = False
    """The sanitizers: KASAN, UBSAN, lockdep, DEBUG_OBJECTS (``data/debug.config``)."""
    coverage: bool = False
    """gcov over the whole kernel (``data/coverage.config``)."""

    @property
    def empty(self) -> bool:
        """Whether this is the default kernel (nothing asked beside the fragment)."""
        return not (self.fragments or self.kunitconfigs or self.kselftest_targets
                    or self.options or self.debug or self.coverage)

    @property
    def variants(self) -> tuple[str, ...]:
        """Which of pytest-umtt's own variants are asked for (``debug``, ``coverage``)."""
        return tuple(name for name in VARIANT_FRAGMENTS if getattr(self, name))

    def describe(self) -> str:
        """How the header names the variant: ``default``, or what was added."""
        if self.empty:
            return "default"
        parts = [*self.variants, *(p.name for p in self.fragments),
                 *(f"kunit:{p.name}" for p in self.kunitconfigs),
                 *(f"kselftest:{t}" for t in self.kselftest_targets), *self.options]
        return "default + " + " + ".join(parts)

    def to_spec(self) -> str:
        """The one-string form :func:`parse_spec` reads (option and ini value)."""
        words = [*(f"+{name}" for name in self.variants), *map(str, self.fragments),
                 *(f"kunit:{p}" for p in self.kunitconfigs),
                 *(f"kselftest:{t}" for t in self.kselftest_targets), *self.options]
        return shlex.join(words)


DEFAULT_CONFIG = KernelConfig()
"""Nothing asked beside pytest-umtt's fragment: the default kernel."""


def parse_spec(spec: str, where: str) -> KernelConfig:
    """A KernelConfig from one string of words: ``CONFIG_X=y`` (an option), ``kunit:FILE``
    (a .kunitconfig), ``kselftest:TARGET`` (its config), ``+debug`` or ``+coverage``
    (pytest-umtt's own variants), else a fragment FILE."""
    try:
        words = shlex.split(spec)
    except ValueError as exc:
        raise KernelError(f"{where}: {exc} in {spec!r}") from None
    fragments, kunit, targets, options = [], [], [], []
    variants: set[str] = set()
    for word in words:
        if word.startswith("+"):
            variants.add(_variant_word(word, where))
        elif word.startswith("CONFIG_"):
            options.append(word)
        elif word.startswith("kunit:"):
            kunit.append(Path(word.removeprefix("kunit:")).expanduser().absolute())
        elif word.startswith("kselftest:"):
            targets.append(word.removeprefix("kselftest:"))
        else:
            fragments.append(Path(word).expanduser().absolute())
    return KernelConfig(tuple(fragments), tuple(kunit), tuple(targets), tuple(options),
                        debug="debug" in variants, coverage="coverage" in variants)


def _variant_word(word: str, where: str) -> str:
    name = word.removeprefix("+")
    if name not in VARIANT_FRAGMENTS:
        raise KernelError(f"{where}: {word!r} is none of pytest-umtt's own variants "
                          f"({', '.join('+' + n for n in VARIANT_FRAGMENTS)})")
    return name


@dataclass(frozen=True, slots=True)
class MergedConfig:
    """The fragment a build applies, and which options the user asked for."""

    text: str
    requested: dict[str, str]
    """The user's options with their final values (pytest-umtt's own are checked apart)."""

    @property
    def digest(self) -> str:
        """Short name of this merged configuration."""
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]


def merge(config: KernelConfig, source_tree: Path) -> MergedConfig:
    """pytest-umtt's fragment, then the user's parts in order, then :data:`REQUIRED`
    again; a user part that contradicts REQUIRED is a KernelError naming it."""
    parts = [(f"--{name}", variant_text(name)) for name in config.variants]
    parts += [(f"{path}", _read(path, "--kconfig")) for path in config.fragments]
    parts += [(f"{path}", _read(path, "--kunitconfig")) for path in config.kunitconfigs]
    for target in config.kselftest_targets:
        parts += kselftest_parts(source_tree, target)
    parts += [("--kconfig-add", "\n".join(_checked_option(o) for o in config.options))]
    requested: dict[str, str] = {}
    for origin, text in parts:
        for name, value in fragment_options(text).items():
            _refuse_contradiction(name, value, origin)
            requested[name] = value
    pinned = "".join(f"{name}={value}\n" if value != "n" else f"# {name} is not set\n"
                     for name, (value, _why) in REQUIRED.items())
    text = fragment_text()
    for origin, part in parts:
        if part.strip():
            text += f"\n# --- from {origin}\n{part.rstrip()}\n"
    if requested:
        text += f"\n# --- what time travel needs wins\n{pinned}"
    return MergedConfig(text, requested)


def _read(path: Path, flag: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise KernelError(f"{flag} {path}: {exc.strerror or exc}") from None


def kselftest_parts(tree: Path, target: str) -> list[tuple[str, str]]:
    """What kselftest ``target`` asks of the kernel: its own ``config`` (some targets, rtc
    and watchdog, have none) and then pytest-umtt's additions for UML
    (``data/kselftest/TARGET.config``, ``/`` spelled ``-``): a target's config assumes
    x86's defconfig beneath it, and UML's lacks what some of them lean on."""
    folder = tree / "tools" / "testing" / "selftests" / target
    if ".." in Path(target).parts or not folder.is_dir():
        raise KernelError(f"--kselftest-config {target}: no {folder} (a target is a directory "
                          f"under tools/testing/selftests, e.g. gpio)")
    parts = []
    if (folder / "config").is_file():
        parts.append((f"kselftest {target}", _read(folder / "config", "--kselftest-config")))
    additions = uml_additions(target)
    if additions:
        parts.append((f"pytest-umtt for kselftest {target} under UML", additions))
    return parts


def uml_additions(target: str) -> str:
    """pytest-umtt's own options for kselftest ``target`` under UML ("" if none)."""
    name = f"data/kselftest/{target.replace('/', '-')}.config"
    found = resources.files("pytest_umtt").joinpath(name)
    return found.read_text() if found.is_file() else ""


def _checked_option(text: str) -> str:
    if _parse_line(text) is None:
        raise KernelError(f"--kconfig-add {text!r}: expected CONFIG_NAME=VALUE "
                          f"(e.g. CONFIG_GPIO_SIM=m)")
    return text


def _refuse_contradiction(name: str, value: str, origin: str) -> None:
    if name in REQUIRED and REQUIRED[name][0] != value:
        want, why = REQUIRED[name]
        raise KernelError(f"{name}={value} (from {origin}) contradicts what pytest-umtt's "
                          f"machines need: {name}={want} ({why})")


def did_not_take(config_text: str, merged: MergedConfig) -> list[str]:
    """The user's options olddefconfig did not keep (a dependency UML lacks), as
    ``CONFIG_X=want (got have)``."""
    actual = fragment_options(config_text)
    return [f"{name}={want} (got {actual.get(name, 'n')})"
            for name, want in merged.requested.items() if actual.get(name, "n") != want]
