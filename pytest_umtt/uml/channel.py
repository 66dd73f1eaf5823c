"""A machine's command channel: how a command reaches the guest agent and how its end
comes back, behind one small protocol with two implementations.

- :mod:`.channel_console` (the default when the kernel has virtio-console): the agent
  blocks reading /dev/hvc0, which the calendar serves; the host names a command there at
  the instant it is submitted, and the agent answers ``D N STATUS`` when it ends.
- :mod:`.channel_files` (the fallback): the agent polls for ``cmd/N.go`` and rings
  doorbells as a command starts and ends.

Either way a command's own files (its text, environment, output) are in ``cmd/N/``
(:class:`.agent.CommandFiles`, kept by :class:`SharedFiles`), and each command is one
:class:`CommandRecord` that the channel fills in with the instants the host saw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..devices import VirtioDevice
from .agent import CommandFiles


@dataclass(slots=True)
class CommandRecord:
    """One command handed to the guest, and the virtual instants (ns) the host saw."""

    number: int
    command: str
    submitted_ns: int
    background: bool
    started_ns: int | None = None
    ended_ns: int | None = None
    status: int | None = None
    """The exit status as the channel carried it; None: it is in the ``result`` file."""
    budget_ns: int | None = None
    """How long a foreground command may take; past it, it is killed."""
    budget_given: bool = False
    """Whether the caller gave that budget (``timeout=``) rather than the machine's default."""
    guest_kills: bool = False
    """Whether the agent was handed the budget and kills the command itself at it."""
    killed_ns: int | None = None
    """When the host asked the agent to kill it (past its budget)."""

    @property
    def finished(self) -> bool:
        return self.ended_ns is not None


class ChannelOwner(Protocol):
    """What a channel tells its machine: the agent is ready; which command a number is."""

    def agent_ready(self) -> None: ...

    def command(self, number: int) -> CommandRecord | None: ...


class CommandChannel(Protocol):
    """How a machine's commands reach its guest agent and how their ends come back."""

    name: str

    @property
    def devices(self) -> Sequence[VirtioDevice]:
        """Devices the channel needs, ahead of the machine's own (the first is /dev/hvc0)."""
        ...

    def kernel_arguments(self) -> list[str]:
        """What the kernel command line tells the agent about the channel."""
        ...

    def open(self, files: CommandFiles) -> None:
        """Take the machine's command files (:func:`.agent.install` made them at spawn)."""
        ...

    def submit(self, record: CommandRecord, files: Mapping[str, bytes]) -> None:
        """Hand the command its ``files`` and tell the agent, at the present instant."""
        ...

    def on_doorbell(self, value: int) -> None:
        """The guest rang the doorbell with ``value``."""
        ...

    def read(self, number: int, name: str) -> bytes:
        """A file the guest wrote for command ``number`` (``stdout``, ``stderr``)."""
        ...

    def exit_status(self, record: CommandRecord) -> int:
        """The exit status of a finished command."""
        ...

    def kill(self, record: CommandRecord) -> bool:
        """Have the agent kill the command's process group now; False when the channel
        cannot reach the agent while a command runs (the agent then kills the command
        at the budget it was handed with it)."""
        ...

    def close(self) -> None: ...


class SharedFiles:
    """What both channels do alike: the agent and the command files in the directory."""

    _files: CommandFiles | None = None

    def open(self, files: CommandFiles) -> None:
        self._files = files

    @property
    def files(self) -> CommandFiles:
        if self._files is None:
            raise FileNotFoundError("the machine was never started: it has no command files")
        return self._files

    def read(self, number: int, name: str) -> bytes:
        return self.files.read(number, name)

    def close(self) -> None:
        if self._files is not None:
            self._files.close()
