"""A fake guest: a process that stands in for a UML kernel and its agent, so machine and
simulation logic can be tested without booting Linux.

`Machine` starts it like a kernel, with the same command line, directory, console and
confinement. It speaks the kernel's side of the time-travel protocol with the reference
client (declining shared memory), and the polling agent's side of the command channel
(pytest_umtt/uml/agent.sh): it looks for ``cmd/N.go``, runs command N, writes
``stdout``, ``stderr`` and ``result``, and rings the doorbell with ``(N << 8) | kind``
exactly where the agent does. A command with a ``timeout`` file is killed that long
after it started, with status 137 and the output it had written, as timeout(1) does.

Commands are a small script language, one statement per line, each taking the virtual
time it says and nothing else:

    echo TEXT        TEXT and a newline on stdout
    warn TEXT        TEXT and a newline on stderr
    sleep SECONDS    virtual time passes
    unkillable SECONDS   virtual time passes, whatever the command's timeout says
    console TEXT     TEXT on the kernel's console, at this instant
    exit N           end with status N
    panic            the kernel panics (console line, process exit)
    reset            a sysrq reset: its console line, then the process re-executes itself
                     (as UML reboots: it neither waits nor leaves)
    spin             a busy loop: virtual time never moves again
    creep NS US      a kernel spinning with preemption off: forever, US microseconds of
                     wall time for every NS ns of virtual time, each step published
                     (the calendar sees a real kernel's creep through its probes)
    echo o > /proc/sysrq-trigger    power off (what Machine.poweroff sends)

Anything else ends the command with status 127 and a message on stderr.
"""

from __future__ import annotations

import heapq
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pytest_umtt.uml.agent import POWEROFF_COMMAND, Bell
from pytest_umtt.units import seconds_to_ns
from pytest_umtt.wire import S64_MAX

from .refclient import RefClient

IDLE_MIN = 1_000_000


class PowerOff(Exception):
    """The guest asked to power off."""


@dataclass
class Command:
    """A command in flight: its number, directory, output so far and statements left."""

    number: int
    directory: Path
    lines: Iterator[str]
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    background: bool = False
    deadline: int | None = None
    killed: bool = False


class FakeGuest:
    """The kernel and the agent: a clock from the calendar, commands from the directory."""

    def __init__(self, client: RefClient, idle_max: int) -> None:
        self.client = client
        self.idle_max = idle_max
        self.next_number = 1
        self.idle = IDLE_MIN
        self.idled = False
        self.running: list[tuple[int, int, Command]] = []  # (wake time, number, command)

    def ring(self, number: int, kind: Bell) -> None:
        # Publish the clock first, as a virtio kick does: a kernel writing bc-message
        # does not, and a free-running one would ring at an instant the calendar has
        # not seen yet.
        self.client.propagate()
        self.client.broadcast((number << 8) | kind)
        # The agent reads the clock after ringing: a time step at the ring's instant,
        # below the horizon the doorbell lowered, so the kernel yields right there.
        self.client.sleep(0)

    def serve(self) -> None:
        self.ring(0, Bell.READY)
        while True:
            if self._take_command():
                continue
            wake = min([self.client.time + self.idle,
                        *(when for when, _, _ in self.running)])
            self.client.sleep(wake - self.client.time)
            self._resume_due()
            if wake == self.client.time and not self.running:
                self.idled = True
                self.idle = min(self.idle * 2, self.idle_max)

    def _take_command(self) -> bool:
        directory = Path("cmd") / str(self.next_number)
        if not Path(f"{directory}.go").exists():
            return False
        number = self.next_number
        self.next_number += 1
        self.idle = IDLE_MIN
        lines = iter((directory / "command").read_text().splitlines())
        command = Command(number, directory, lines, background=(directory / "background").exists())
        budget = directory / "timeout"
        if budget.exists():
            command.deadline = self.client.time + seconds_to_ns(float(budget.read_text()))
        if command.background or self.idled:
            self.ring(number, Bell.STARTED)
        self.idled = False
        self._step(command)
        if not command.background:
            while any(c is command for _, _, c in self.running):
                when = min(w for w, _, c in self.running if c is command)
                self.client.sleep(when - self.client.time)
                self._resume_due()
        return True

    def _resume_due(self) -> None:
        while self.running and self.running[0][0] <= self.client.time:
            _, _, command = heapq.heappop(self.running)
            self._step(command)

    def _step(self, command: Command) -> None:
        """Run statements until one takes time (it is parked) or the command ends."""
        if command.killed:
            self._finish(command, 128 + 9)
            return
        for line in command.lines:
            verb, _, rest = line.strip().partition(" ")
            if line.strip() == POWEROFF_COMMAND:
                raise PowerOff
            if verb in ("sleep", "unkillable"):
                wake = self.client.time + seconds_to_ns(float(rest))
                if verb == "sleep" and command.deadline is not None and wake > command.deadline:
                    wake, command.killed = command.deadline, True
                heapq.heappush(self.running, (wake, command.number, command))
                return
            status = self._statement(command, verb, rest)
            if status is not None:
                self._finish(command, status)
                return
        self._finish(command, 0)

    def _statement(self, command: Command, verb: str, rest: str) -> int | None:
        if verb == "echo":
            command.stdout.append(rest + "\n")
        elif verb == "warn":
            command.stderr.append(rest + "\n")
        elif verb == "console":
            console(rest)
        elif verb == "exit":
            return int(rest)
        elif verb == "reset":
            console("sysrq: Resetting")
            # UML's connection to the calendar survives its exec, silent from then on.
            self.client.sock.set_inheritable(True)
            os.execv(sys.argv[0], sys.argv)
        elif verb == "panic":
            console("Kernel panic - not syncing: the fake guest was told to panic")
            os._exit(1)
        elif verb == "spin":
            while True:
                pass
        elif verb == "creep":
            self._creep(*(int(word) for word in rest.split()))
        else:
            command.stderr.append(f"fake guest: {verb}: not a statement\n")
            return 127
        return None

    def _creep(self, step_ns: int, wall_us: int) -> None:
        """Never returns: like cpu_relax() under time travel, each step is a time step,
        so the clock stops (the kernel yields) at the horizon and nowhere else."""
        while True:
            time.sleep(wall_us / 1e6)  # the work the step stands for, in wall time
            self.client.sleep(step_ns)
            self.client.propagate()

    def _finish(self, command: Command, status: int) -> None:
        (command.directory / "stdout").write_text("".join(command.stdout))
        (command.directory / "stderr").write_text("".join(command.stderr))
        (command.directory / "result").write_text(f"{status}\n")
        self.ring(command.number, Bell.DONE)


def console(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    """Boot like UML: find the calendar and the agent's settings on the command line."""
    options = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    _, start_id, path = options["time-travel"].split(":", 2)
    idle_max = int(options.get("UMTT_IDLE_MAX_US", "100000")) * 1000
    console("Linux version 0.0-fake (fake guest for pytest-umtt's tests)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    client = RefClient(sock, timeout=3600, take_shm=False)
    client.start(int(start_id))
    console("Run /bin/bash as init process")
    try:
        FakeGuest(client, idle_max).serve()
    except PowerOff:
        console("reboot: Power down")
        client.request(S64_MAX)
    client.close()
    return 0
