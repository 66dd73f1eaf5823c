"""The polled-files command channel: the fallback for kernels without virtio-console.

The host writes ``cmd/N.go`` after command N's files; the agent's main loop polls for it
(backing off to the machine's ``idle_max`` of virtual time, so a command submitted after
idling starts up to that late), writes ``result``, and rings the doorbell when it is
ready, when it starts a command after having idled (or in the background), and when a
foreground command ends (agent.sh). The host takes every instant from those doorbells.
The agent cannot hear the host while a foreground command runs, so a foreground command
given a timeout carries it (its ``timeout`` file), and the agent kills its process group
then. One that outlives the machine's default budget instead stops its machine.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..devices import VirtioDevice
from ..errors import NS_PER_S
from .agent import Bell, decode
from .channel import ChannelOwner, CommandRecord, SharedFiles

if TYPE_CHECKING:
    from ..controller import Calendar


class FilesChannel(SharedFiles):
    """Commands through ``cmd/N.go``, their instants from the agent's doorbells."""

    name = "files"

    def __init__(self, owner: ChannelOwner, calendar: Calendar) -> None:
        self.devices: tuple[VirtioDevice, ...] = ()
        self._owner = owner
        self._calendar = calendar
        self._last_loop_ring = 0

    def kernel_arguments(self) -> list[str]:
        return []

    def submit(self, record: CommandRecord, files: Mapping[str, bytes]) -> None:
        if record.budget_ns is not None and record.budget_given:
            # The agent hears nothing while a foreground command runs: it kills the
            # command itself at its budget (timeout(1), which kills its process group).
            # Only a budget the caller gave: timeout(1) and a second bash cost two execs,
            # which would double every command's wall time for the default day.
            seconds, rest = divmod(record.budget_ns, NS_PER_S)
            files = {**files, "timeout": f"{seconds}.{rest:09d}".encode()}
            record.guest_kills = True
        self.files.submit(record.number, files, go=True)

    def kill(self, record: CommandRecord) -> bool:
        return False

    def on_doorbell(self, value: int) -> None:
        """The agent rang: it is ready, a command started or ended.

        A foreground command that the agent did not ring for as it started started at the
        loop's previous ring (it looked for the command right after that ring, at the
        same instant). A background command's end is rung by its own subshell, not by the
        loop, so it is no ring of the loop's."""
        kind, number = decode(value)
        now = self._calendar.now
        record = self._owner.command(number)
        if kind == Bell.READY:
            self._owner.agent_ready()
        elif kind == Bell.DONE and record is not None:
            record.ended_ns = now
            if record.background:
                return
            if record.started_ns is None:
                record.started_ns = max(self._last_loop_ring, record.submitted_ns)
        elif kind == Bell.STARTED and record is not None:
            record.started_ns = now
        self._last_loop_ring = now

    def exit_status(self, record: CommandRecord) -> int:
        return int(self.files.read(record.number, "result").split()[0])
