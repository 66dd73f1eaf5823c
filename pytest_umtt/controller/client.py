"""The calendar's participants: a :class:`Client` (one kernel on a socket) and where it
is in its life, the ACKs it owes, and a broadcast waiting for its recipients' ACKs.
Plain data on top of :mod:`.reactor`'s connection; the protocol that moves them is
the calendar's (:mod:`.core`, :mod:`.membership`, :mod:`.handlers`)."""

from __future__ import annotations

import enum
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ProtocolError
from ..wire import NO_ID, Message, Op
from .clock import Job
from .reactor import Connection


class ClientState(enum.Enum):
    """Where a socket client is in its life (§3 client states)."""

    CONNECTED = "connected"
    STARTING = "starting"
    RUNNING = "running"
    WAITING = "waiting"
    GONE = "gone"


@dataclass(eq=False)
class PendingAck:
    """An ACK a client owes; ``then`` runs on it, or with None when the client leaves."""

    seq: int
    op: Op
    then: Callable[[Message | None], None] | None = None


@dataclass(eq=False)
class Broadcast:
    """A client's BROADCAST, ACKed to it once every recipient in ``waiting`` ACKed."""

    sender: Client
    seq: int
    value: int
    waiting: set[Client] = field(default_factory=set)


class Client(Connection):
    """A participant connected over the socket: normally one UML kernel."""

    def __init__(self, sock: socket.socket, serial: int, label: str | None) -> None:
        super().__init__(sock)
        self.serial = serial
        self.label = label
        self.state = ClientState.CONNECTED
        self.start_id: int | None = None
        self.start_seq = 0
        self.id = 0
        self.shm = False
        # Whether its id has an entry inside the map, and whether it was offered the map
        # and has not yet said (through capa) whether it took it.
        self.in_map = False
        self.capa_pending = False
        self.offset = 0
        self.job: Job | None = None
        self.pending_acks: deque[PendingAck] = deque()
        self.error: ProtocolError | None = None

    @property
    def name(self) -> str:
        """A label for messages: the caller's label, else the START id, else the serial."""
        if self.label:
            return self.label
        if self.start_id is not None and self.start_id != NO_ID:
            return f"client {self.start_id:#x}"
        return f"client #{self.serial}"

    @property
    def request(self) -> int | None:
        """The absolute virtual time this client asked to run at next, if any."""
        return None if self.job is None or self.job.cancelled else self.job.time

    @property
    def started(self) -> bool:
        """True once its START was acknowledged, until it leaves."""
        return self.state in (ClientState.RUNNING, ClientState.WAITING)

    def __repr__(self) -> str:
        mode = "shm" if self.shm else "msg"
        return f"<Client {self.name} id={self.id} {mode} {self.state.value}>"


def start_order(client: Client) -> tuple[int, int]:
    """STARTs are served by ID, ascending and stable (as usfstl does); a kernel started
    without one (id -1, time.c:648) sorts as ID 0, since usfstl keeps its name at 0."""
    start_id = client.start_id
    return (0 if start_id is None or start_id == NO_ID else start_id, client.serial)
