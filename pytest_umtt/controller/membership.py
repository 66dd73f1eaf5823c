"""Joining and leaving: a START acknowledged and a client given its id (and the shared
memory, if it takes it), and a client dropped (for an error or its departure) with no
trace of it left in the schedule. :class:`Membership` is the layer on :class:`.core.Core`
that does both; the message handlers (:mod:`.handlers`) are above it."""

from __future__ import annotations

from ..errors import ProtocolError
from ..wire import NO_ID, START_ACK_ID_MASK, Message, Op
from .client import Client, ClientState
from .core import Core

MAX_CLIENT_ID = START_ACK_ID_MASK


class Membership(Core):
    """Joining (§3 process_starting_client) and leaving (§3 Removal)."""

    # --- joining -------------------------------------------------------------------

    def _process_start(self, client: Client) -> None:
        """ACK a START; the client then runs until its first WAIT (§3 process_starting_client)."""
        self._starting.remove(client)
        self._record("rx", client, Message(Op.START, client.start_seq, client.start_id or 0))
        client.offset = self._clock.now
        client.id = self._free_id()
        if client.id == 0:
            self._fail(client, f"no free client id (limit {MAX_CLIENT_ID})")
            return
        client.in_map = self._map.has_entry(client.id)
        client.capa_pending = client.in_map and self._map.can_offer(
            enabled=self.shm_enabled, late_joiners=self.late_joiners_shm)
        if client.in_map:
            self._map.join(client, 0 if client.start_id == NO_ID else (client.start_id or 0))
        # No free run for a joiner: it yields at its first time step, so clients that
        # start together run together, and a late joiner cannot run past a pending
        # event (usfstl 963e035, §6d).
        self._begin_run(client, horizon=self._clock.now)
        self._record("join", client, detail="offered shm" if client.capa_pending
                     else "over messages")
        fds = [self._map.fd if client.capa_pending else self._map.decoy_fd, self._log_fd]
        self._send(client, Message(Op.ACK, client.start_seq, client.id & START_ACK_ID_MASK),
                   fds=fds)

    def _read_capa(self, client: Client) -> None:
        """Its first message after the START ACK: a kernel sets capa before it sends
        anything (time.c:103), so capa now says whether it took the map."""
        client.capa_pending = False
        client.shm = self._map.took_map(client.id)
        self._record("mode", client, detail="uses shm" if client.shm
                     else "declined shm: over messages")

    def _free_id(self) -> int:
        used = {c.id for c in self.clients if c.id and c.state is not ClientState.GONE}
        for candidate in range(1, MAX_CLIENT_ID + 1):
            if candidate not in used:
                return candidate
        return 0

    # --- leaving -------------------------------------------------------------------

    def _fail(self, client: Client, detail: str, message: Message | None = None) -> None:
        error = ProtocolError(client.name, detail, self._clock.now,
                              str(message) if message else None)
        client.error = error
        self.errors.append(error)
        self._remove(client, error)

    def _disconnected(self, client: Client) -> None:
        self._remove(client, None)

    def _remove(self, client: Client, error: ProtocolError | None) -> None:
        """Drop a client: no trace of it remains in the schedule (§3 Removal)."""
        if client.state is ClientState.GONE:
            return
        self._record("drop", client, detail=str(error) if error else "disconnected")
        client.state = ClientState.GONE
        self._reactor.discard(client)
        self._unqueue(client)
        if client in self._starting:
            self._starting.remove(client)
        self._map.leave(client)
        if client is self._runner:
            self._runner = None
            self._map.end_run()
            # What others wrote into shared memory while it ran is collected at a WAIT
            # that now never comes.
            self._collect_shm_requests()
        for pending in list(self._broadcasts):
            if pending.sender is client:
                self._broadcasts.remove(pending)
        # What waited for its ACKs goes on: broadcasts, held requesters.
        while client.pending_acks:
            owed = client.pending_acks.popleft()
            if owed.then is not None:
                owed.then(None)
        for hook in self.on_drop:
            hook(client, error)
