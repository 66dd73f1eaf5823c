"""The guest agent's files, the host's side of agent.sh that both command channels share.

The agent is init in every machine (:func:`install` puts it there). The host writes
command N into ``cmd/N/`` (the command, and optionally ``env``, ``cwd``, ``timeout``,
``background``), always while the simulation is paused; the agent runs it with its
output in ``stdout`` and ``stderr`` there (:class:`CommandFiles`). How the agent learns of
the command and how the host learns of its end is the channel's business
(:mod:`.channel`): over the polled files, the host also writes ``cmd/N.go`` and the agent
writes ``result`` and rings the doorbell (``/sys/kernel/um-ext-time/bc-message``) with
``(N << 8) | kind`` (:class:`Bell`), which is how the host learns the exact virtual
instant of each step (DESIGN.md facts 6 and 8).
"""

from __future__ import annotations

import enum
import os
import shutil
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

COMMANDS_DIR = "cmd"
BOOT_SCRIPT = "boot.sh"
FSTAB = "fstab"
MODULES_LINK = "lib-modules"
POWEROFF_COMMAND = ": > /run/umtt-poweroff; echo o > /proc/sysrq-trigger"
"""The marker tells the agent its console is about to go (agent.sh, serve_console)."""


class Bell(enum.IntEnum):
    """What a doorbell from the agent says (its low byte; the command number above)."""

    READY = 1
    DONE = 2
    STARTED = 3


def decode(value: int) -> tuple[int, int]:
    """``(kind, command number)`` of a doorbell value."""
    return value & 0xFF, value >> 8


def install(directory: Path, agent: Path | None = None,
            modules: Path | None = None) -> CommandFiles:
    """Put the agent (``agent`` or agent.sh) and its fstab into a new machine's
    directory, and open its command files there. ``modules`` (the kernel's installed
    modules, ``lib/modules`` of modules_install) is linked in as ``lib-modules``: the
    agent mounts it at /lib/modules through hostfs, so the host's kernel follows the
    link and the guest reads the modules where modprobe looks."""
    if modules is not None:
        (directory / MODULES_LINK).symlink_to(modules)
    script = directory / BOOT_SCRIPT
    source = agent or resources.files("pytest_umtt.uml").joinpath("agent.sh")
    script.write_bytes(source.read_bytes())
    script.chmod(0o755)
    shutil.copyfile(Path(str(resources.files("pytest_umtt.uml").joinpath("fstab"))),
                    directory / FSTAB)
    return CommandFiles(directory)


class CommandFiles:
    """The host's side of the command files in a machine's directory.

    The guest can change anything in that directory, so the host never follows a link
    there: it works through a descriptor of ``cmd/`` opened at boot, makes each command's
    directory itself, and opens every file with O_NOFOLLOW. The guest cannot run while
    the host does this (the simulation is paused), so nothing changes in between."""

    def __init__(self, machine_directory: Path) -> None:
        commands = machine_directory / COMMANDS_DIR
        commands.mkdir()
        self._fd = os.open(commands, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)

    def submit(self, number: int, files: Mapping[str, bytes], *, go: bool = True) -> None:
        """Write command ``number``'s files, then (``go``) its ``N.go``: the polling agent
        acts on that; over the console, the host names the command there instead."""
        os.mkdir(str(number), 0o700, dir_fd=self._fd)
        directory = os.open(str(number), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                            dir_fd=self._fd)
        try:
            for name, data in files.items():
                _write_new(name, data, directory)
        finally:
            os.close(directory)
        if go:
            _write_new(f"{number}.go", b"", self._fd)

    def read(self, number: int, name: str) -> bytes:
        """A file the guest wrote for command ``number``."""
        return read_without_links(self._fd, (str(number), name))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_without_links(top: int, parts: Sequence[str]) -> bytes:
    """Read ``top/parts...`` where every component must be no link."""
    directory = os.dup(top)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW,
                            dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    finally:
        os.close(directory)
    with os.fdopen(fd, "rb") as stream:
        return stream.read()


def _write_new(name: str, data: bytes, directory: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=directory)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
