"""The calendar's side of the shared memory (schedshm v2, PROTOCOL.md §2).

:class:`ScheduleMap` owns the memfd map, the decoy given to clients served over
messages, and the entries of the clients that have one; it reads ``capa`` to learn
who took the map (§7.4), collects requests written into it, and writes what the
calendar tells a running kernel there: ``running_id``, ``current_time`` (§7.3) and
``free_until``. It knows nothing of messages: the engine (:mod:`.engine`) decides
when each of these happens.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from typing import Generic, Protocol, TypeVar

from ..wire import SHM_HEADER_SIZE, U64_MAX, Capability, ClientFlag, SharedMemory, shm_size
from .clock import Clock, Job

_REQ_RUN = ClientFlag.REQ_RUN.value

# The header fields the calendar reads and writes at every run, without the views'
# descriptors (H:um_timetravel_schedshm: free_until at 8, current_time at 16,
# running_id at 24): a run touches them five or six times.
_FREE_UNTIL = 8
_CURRENT_TIME = 16
_RUNNING_ID = 24
_U64 = struct.Struct("=Q")
_U16 = struct.Struct("=H")


class MapClient(Protocol):
    """What the map needs to know of a client (the engine's Client is one)."""

    @property
    def id(self) -> int:
        """Its client id, the index of its entry."""

    @property
    def shm(self) -> bool:
        """Whether it took the map."""

    @property
    def state(self) -> object:
        """Compared with the waiting state."""

    @property
    def job(self) -> Job | None:
        """Where it is queued, if anywhere."""


C = TypeVar("C", bound=MapClient)


class ScheduleMap(Generic[C]):
    """The shared-memory map with ``entries`` entries (the controller's is one), and the
    decoy; ``clock`` is the calendar's, read and moved by :meth:`sync`."""

    def __init__(self, clock: Clock, entries: int) -> None:
        self._clock = clock
        self.entries = entries
        self.fd, self._map = _create_memfd("umtt-schedshm", shm_size(entries))
        self.view = SharedMemory(self._map)
        self.view.init_header(entries)
        # Clients served over messages still get two fds in the START ACK: a memfd whose
        # version is not 2, because a kernel given no fds mmaps and closes garbage (§6b).
        # Its len is its size: usfstl's client library maps len bytes before it checks
        # the version, and the kernel needs 4096 readable bytes (time.c:81-91).
        self.decoy_fd, self._decoy_map = _create_memfd("umtt-noshm", SHM_HEADER_SIZE)
        SharedMemory(self._decoy_map).length = SHM_HEADER_SIZE
        self.clients: list[C] = []  # clients with an entry in the map, by start
        self._last_id = 0  # the highest id among them

    def close(self) -> None:
        """Unmap and close both memfds."""
        for fd, mapping in ((self.fd, self._map), (self.decoy_fd, self._decoy_map)):
            mapping.close()
            os.close(fd)

    # --- entries ------------------------------------------------------------------

    def has_entry(self, client_id: int) -> bool:
        """Whether ``client_id`` indexes an entry inside the map."""
        return client_id < self.entries

    def can_offer(self, *, enabled: bool, late_joiners: bool) -> bool:
        """Whether to offer the map to a joiner (§7.4). A kernel takes current_time as its
        offset when it attaches (time.c:101) and applies RUN to its local clock as it
        comes (time.c:158), so a late joiner works as long as its RUN and REQUEST
        messages are local, which they are for every client (client.offset is its join
        time), and current_time is exactly its join time. usfstl sends absolute RUNs,
        and a kernel joining at a time other than 0 BUGs on its first one (time.c:535)."""
        if not enabled:
            return False
        now = self._clock.now
        if now != 0 and not late_joiners:
            return False
        return self.view.current_time == now

    def join(self, client: C, name: int) -> None:
        """Give ``client`` (whose id has an entry) a clean entry named ``name``."""
        self.clients.append(client)
        self._last_id = max(c.id for c in self.clients)
        entry = self.view.entry(client.id)
        entry.clear()
        entry.name = name

    def leave(self, client: C) -> None:
        """Clear the entry of a client that left, if it had one."""
        if client in self.clients:
            self.clients.remove(client)
            self._last_id = max((c.id for c in self.clients), default=0)
            self.view.entry(client.id).clear()

    def took_map(self, client_id: int) -> bool:
        """Whether the client set TIME_SHARE in its capa: a kernel sets capa before it
        sends anything (time.c:103), so this is read at its first message."""
        return bool(self.view.entry(client_id).capa & Capability.TIME_SHARE)

    def mirror_request(self, client_id: int, when: int) -> None:
        """Write a REQUEST message's time into the entry, so that a later collection
        sees it and not a stale one."""
        self.view.entry(client_id).post_request(min(when, U64_MAX))

    def clear_request(self, client_id: int) -> None:
        """A kernel clears REQ_RUN itself on RUN; a message client cannot (M:693-695)."""
        self.view.entry(client_id).flags = 0

    def written_requests(self, waiting: object) -> list[tuple[C, int]]:
        """The requests written into the map (time.c:284-288) by clients in state
        ``waiting``, in start order, that are not already queued where they ask."""
        clients = self.clients
        if not clients:
            return []
        values = self.view.requests(self._last_id)
        found = []
        for client in clients:
            if client.state is not waiting:
                continue
            index = 2 * client.id - 2
            if not values[index] & _REQ_RUN:
                continue
            when = values[index + 1]
            job = client.job
            if job is not None and job.time == when and not job.cancelled:
                continue  # already queued there, the common case
            found.append((client, when))
        return found

    # --- the runner -----------------------------------------------------------------

    def begin_run(self, client: C, in_map: bool, horizon: int) -> None:
        """``client`` runs until ``horizon``. running_id names every runner whose entry
        is in the map: a waiting kernel reads the runner's capa to choose between shared
        memory and a REQUEST message (time.c:281-283), and indexes clients[] with it
        unchecked, so never beyond len."""
        buf = self._map
        _U16.pack_into(buf, _RUNNING_ID, client.id if in_map else 0)
        self.publish()
        _U64.pack_into(buf, _FREE_UNTIL, min(horizon, U64_MAX))

    def end_run(self) -> None:
        """Nobody runs: running_id names no shm client, so everyone uses messages."""
        _U16.pack_into(self._map, _RUNNING_ID, 0)

    def lower_free_until(self, when: int) -> None:
        """Make a shm runner yield at ``when`` if it would have run past it."""
        buf = self._map
        if when < _U64.unpack_from(buf, _FREE_UNTIL)[0]:
            _U64.pack_into(buf, _FREE_UNTIL, when)

    def probe(self) -> bool:
        """Lower free_until to now if it is later; True if it was."""
        view = self.view
        if view.free_until > self._clock.now:
            view.free_until = self._clock.now
            return True
        return False

    def sync(self, runner: C | None, limit: int | None) -> int:
        """While a shm kernel runs, now is the time it published in current_time, as far
        as free_until (and the run's deadline, ``limit``) let it go: GET, GET_TOD and a
        joiner's origin all read it, and no waiting kernel may later read an earlier one
        (§7.3). Moves the clock there and returns now."""
        clock = self._clock
        if runner is not None and runner.shm:
            buf = self._map
            published = min(_U64.unpack_from(buf, _CURRENT_TIME)[0],
                            _U64.unpack_from(buf, _FREE_UNTIL)[0])
            if limit is not None:
                published = min(published, limit)
            if published > clock.now:
                clock.move_to(published)
        return clock.now

    def publish(self) -> None:
        """current_time is never written back: a waiting kernel reads it on an interrupt,
        and one that saw a later value panics "time goes backwards" (K:50-53, 367)."""
        buf = self._map
        now = self._clock.now
        if _U64.unpack_from(buf, _CURRENT_TIME)[0] < now:
            _U64.pack_into(buf, _CURRENT_TIME, min(now, U64_MAX))


def _create_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A sealed-size memfd and a shared mapping of it (§2: sealed against grow/shrink)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    return fd, mmap.mmap(fd, size)
