"""The virtio-console command channel: the default when the kernel has virtio-console.

The machine's first virtio console (/dev/hvc0) is served by the calendar. The agent
blocks reading it, so an idle machine costs nothing; the host writes ``N`` there at the
instant a test submits command N (an interrupt at that virtual instant: that is when the
command starts), and the agent writes ``R`` when it is ready and ``D N STATUS`` when
command N ends, which the host sees at the instant it is written (agent.sh). Each
command runs in a process group of its own, so ``K N`` kills command N with what it
started, at the instant the host writes it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..devices.console import VirtioConsole
from .channel import ChannelOwner, CommandRecord, SharedFiles

if TYPE_CHECKING:
    from ..controller import Calendar

AGENT_CHANNEL_ENV = "UMTT_AGENT_CHANNEL"
AGENT_LINE = re.compile(rb"(?:R|D (?P<done>\d{1,9}) (?P<status>\d{1,3}))$")
"""What the agent writes, at the end of a line: a half line a command left on hvc0 may
come before it."""
MAX_AGENT_LINE = 64


class ConsoleChannel(SharedFiles):
    """Commands named on /dev/hvc0, their ends read from it."""

    name = "console"

    def __init__(self, owner: ChannelOwner, calendar: Calendar) -> None:
        self.device = VirtioConsole("agent", on_receive=self._on_agent_output)
        self.devices = (self.device,)
        self._owner = owner
        self._calendar = calendar
        self._agent_output = bytearray()

    def kernel_arguments(self) -> list[str]:
        return [f"{AGENT_CHANNEL_ENV}=console"]

    def submit(self, record: CommandRecord, files: Mapping[str, bytes]) -> None:
        self.files.submit(record.number, files, go=False)
        # The guest reads it at this very instant: that is when the command starts.
        record.started_ns = self._calendar.now
        self.device.send(f"{record.number}\n".encode())

    def kill(self, record: CommandRecord) -> bool:
        self.device.send(f"K {record.number}\n".encode())
        return True

    def on_doorbell(self, value: int) -> None:
        """Doorbells are the guest's own here: the agent does not ring."""

    def exit_status(self, record: CommandRecord) -> int:
        assert record.status is not None  # set with its end, from the agent's line
        return record.status

    def _on_agent_output(self, data: bytes) -> None:
        """Lines the agent wrote to /dev/hvc0, at the instant it wrote them: ``R``
        (ready) and ``D N STATUS`` (command N ended). A guest command can write there
        too: lines that name no command in flight are ignored (a command that forges
        the line of another one in flight can end it early, as a guest root can)."""
        self._agent_output += data
        *lines, rest = self._agent_output.split(b"\n")
        self._agent_output = bytearray(rest[-MAX_AGENT_LINE:])
        if lines and self.device.backend:
            # A wait may end at this instant: the kernel must not run on past it.
            self._calendar.recall_runner(self.device.backend.defer_reply())
        for line in lines:
            match = AGENT_LINE.search(line.rstrip(b"\r"))
            if match is None:
                continue
            if match["done"] is None:
                self._owner.agent_ready()
                continue
            self._ended(int(match["done"]), int(match["status"]))

    def _ended(self, number: int, status: int) -> None:
        record = self._owner.command(number)
        if record is not None and not record.finished:
            record.ended_ns = self._calendar.now
            record.status = status
