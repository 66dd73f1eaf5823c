"""The transport: non-blocking stream sockets carrying fixed-size frames, on epoll.

Knows nothing of the protocol the frames carry. A :class:`Reactor` serves
:class:`Connection` objects (the caller's, usually subclasses with their own state): it
reads one frame per read, queues output per connection and writes it at the end of each
pump without ever blocking, drops a connection whose backlog passes a bound, passes file
descriptors with SCM_RIGHTS, accepts on a listening Unix socket, and calls back extra
descriptors' readers (consoles, device sockets). It tells its owner what happened through
four callbacks: a frame, a departure, an error, a newcomer.
"""

from __future__ import annotations

import errno
import math
import os
import select
import socket
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from ..errors import SocketInUseError

FRAME_SIZE = 16
"""Bytes per frame: a time-travel message (u32 op, u32 seq, u64 time)."""

MAX_BACKLOG = 64 * 1024
"""Bytes queued for one connection that does not read (4096 frames) before it is
dropped. A kernel never has more than a handful of messages outstanding."""

_IN = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_OUT = select.EPOLLOUT


class Connection:
    """A connected stream socket and its queued output."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.outbox = bytearray()
        self.blocked = False  # the socket took less than we had: waiting for EPOLLOUT
        self.open = True


C = TypeVar("C", bound=Connection)


class Reactor(Generic[C]):
    """epoll over connections, one listener and extra readers.

    ``on_frame(conn, data)`` gets each frame read; ``on_close(conn)`` a peer that left;
    ``on_error(conn, detail)`` a transport error (the owner decides to :meth:`discard`
    it); ``on_accept(sock)`` turns an accepted socket into an attached connection.
    """

    def __init__(
        self,
        *,
        on_frame: Callable[[C, bytes], None],
        on_close: Callable[[C], None],
        on_error: Callable[[C, str], None],
        on_accept: Callable[[socket.socket], C],
        frame_size: int = FRAME_SIZE,
        max_backlog: int = MAX_BACKLOG,
    ) -> None:
        self._on_frame = on_frame
        self._on_close = on_close
        self._on_error = on_error
        self._on_accept = on_accept
        self.frame_size = frame_size
        self.max_backlog = max_backlog
        self._epoll = select.epoll()
        self._conns: dict[int, C] = {}
        self._readers: dict[int, Callable[[], None]] = {}
        self._writers: dict[int, Callable[[], None]] = {}
        self._dirty: list[C] = []  # connections with queued output, in queueing order
        self._listener: socket.socket | None = None
        self._listener_fd = -1
        self.socket_path: Path | None = None
        # Held in reserve so that running out of descriptors can still accept, and so
        # drop, a newcomer instead of spinning on a listener that stays readable.
        self._spare_fd: int | None = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.sleeps = 0
        """Waits that went to sleep in epoll_wait (each one a process wake-up later)."""
        self.spun = 0
        """Waits answered while spinning, without sleeping."""
        self.reactions = 0
        self.reaction_time = 0.0
        """Wall seconds from a wait's end to the first write after it, summed over
        ``reactions``: how long a peer waits for the answer to what woke us."""
        self._woke = 0.0

    # --- registration ---------------------------------------------------------------

    def listen(self, path: str | os.PathLike[str]) -> Path:
        """Accept connections on a Unix socket at ``path``. A stale socket there (nobody
        accepts on it) is replaced; a live one raises SocketInUseError."""
        socket_path = Path(path)
        if socket_path.is_socket():
            _remove_stale_socket(socket_path)
        listener = _bind(socket_path)
        os.chmod(socket_path, 0o600)
        listener.listen(128)
        listener.setblocking(False)
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._listener, self._listener_fd = listener, listener.fileno()
        self.socket_path = socket_path
        return socket_path

    def attach(self, conn: C) -> C:
        """Serve ``conn``: make its socket non-blocking and watch it."""
        conn.sock.setblocking(False)
        self._epoll.register(conn.fd, select.EPOLLIN)
        self._conns[conn.fd] = conn
        return conn

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever ``fd`` is readable, during :meth:`pump`."""
        self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (a no-op if it is not watched), for writing too."""
        self._writers.pop(fd, None)
        if self._readers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        """Also call ``callback`` whenever ``fd`` (a reader's) is writable, until
        :meth:`remove_writer`: for output that did not fit."""
        if fd in self._readers and fd not in self._writers:
            self._writers[fd] = callback
            self._epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)

    def remove_writer(self, fd: int) -> None:
        """Stop calling ``fd``'s writer (a no-op if it has none)."""
        if self._writers.pop(fd, None) is not None and fd in self._readers:
            self._epoll.modify(fd, select.EPOLLIN)

    def discard(self, conn: C) -> None:
        """Stop serving ``conn``, close its socket and forget its output."""
        conn.open = False
        if self._conns.pop(conn.fd, None) is not None:
            self._epoll.unregister(conn.fd)
        conn.sock.close()
        conn.outbox.clear()

    def close(self) -> None:
        """Stop listening (removing the socket) and release epoll. Connections are the
        owner's to discard first."""
        if self._listener is not None:
            self._epoll.unregister(self._listener_fd)
            self._listener.close()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
        self._epoll.close()
        if self._spare_fd is not None:
            os.close(self._spare_fd)
            self._spare_fd = None

    # --- output ---------------------------------------------------------------------

    def send(self, conn: C, frame: bytes) -> None:
        """Queue ``frame`` for ``conn``; it goes out at the next :meth:`flush`, in order,
        consecutive frames to one connection in a single write. A connection whose queue
        passes ``max_backlog`` is reported to ``on_error``."""
        outbox = conn.outbox
        if not outbox:
            self._dirty.append(conn)
        outbox += frame
        if len(outbox) > self.max_backlog:
            self._on_error(conn, f"it does not read its messages ({len(outbox)} bytes "
                                 f"queued for it)")

    def send_with_fds(self, conn: C, frame: bytes, fds: list[int]) -> None:
        """Write ``frame`` now with ``fds`` attached (SCM_RIGHTS), after what was queued;
        OSError when it cannot go out whole at once."""
        if conn.outbox:
            self._write(conn)  # what was queued before goes first
        if conn.outbox:
            raise BlockingIOError(errno.EAGAIN, "it does not read its messages")
        conn.sock.sendmsg([frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))])

    @property
    def has_output(self) -> bool:
        """Whether frames wait for the next :meth:`flush`."""
        return bool(self._dirty)

    def flush(self) -> None:
        """Write every queued frame, in the order they were queued."""
        dirty = self._dirty
        while dirty:
            conn = dirty.pop(0)
            if conn.outbox and not conn.blocked and conn.open:
                self._write(conn)

    def _write(self, conn: C) -> None:
        """Write what ``conn`` will take now; wait for it to be writable for the rest."""
        if self._woke:
            self.reaction_time += time.perf_counter() - self._woke
            self.reactions += 1
            self._woke = 0.0
        try:
            sent = conn.sock.send(conn.outbox)
        except BlockingIOError:
            sent = 0
        except (BrokenPipeError, ConnectionResetError):
            self._on_close(conn)  # it left; its EOF may not have been read yet
            return
        except OSError as exc:
            self._on_error(conn, f"write error: {exc.strerror or exc}")
            return
        del conn.outbox[:sent]
        blocked = bool(conn.outbox)
        if blocked != conn.blocked:
            conn.blocked = blocked
            self._epoll.modify(conn.fd, select.EPOLLIN | (_OUT if blocked else 0))

    # --- input ----------------------------------------------------------------------

    def pump(self, timeout: float, spin: float = 0.0) -> bool:
        """Flush, wait up to ``timeout`` (seconds; inf: forever) for events and handle
        them all, then flush again; True if there were any. ``spin`` is how long to
        poll without sleeping first, for a peer that answers within microseconds."""
        if self._dirty:
            self.flush()
        events = self._wait(timeout, spin)
        if events:
            self._woke = time.perf_counter()
        conns = self._conns
        for fd, mask in events:
            conn = conns.get(fd)  # None: an earlier handler in this batch discarded it
            if conn is not None:
                if mask & _OUT and conn.open:
                    self._write(conn)
                if mask & _IN and conn.open:
                    self._receive(conn)
            elif fd == self._listener_fd:
                self._accept()
            elif fd in self._readers:
                self._serve_reader(fd, mask)
        if self._dirty:
            self.flush()
        return bool(events)

    def _serve_reader(self, fd: int, mask: int) -> None:
        """An extra descriptor's events: its writer first (a waiting reply), then its
        reader; either may have stopped watching it by the time the other would run."""
        if mask & _OUT and (writer := self._writers.get(fd)) is not None:
            writer()
        if mask & ~_OUT and (reader := self._readers.get(fd)) is not None:
            reader()

    def _wait(self, timeout: float, spin: float) -> list[tuple[int, int]]:
        """epoll_wait, after up to ``spin`` seconds of polling: a running peer's next
        frame usually comes sooner than a sleeping process wakes up."""
        poll = self._epoll.poll
        if spin > 0 and timeout > 0:
            give_up = time.perf_counter() + min(spin, timeout)
            while not (events := poll(0)) and time.perf_counter() < give_up:
                os.sched_yield()  # the peer may be waiting for this very CPU
            if events:
                self.spun += 1
                return events
        if timeout > 0:
            self.sleeps += 1
        return poll(-1 if math.isinf(timeout) else timeout)

    def _receive(self, conn: C) -> None:
        """One read, one frame, as both the kernel and usfstl expect (§1)."""
        try:
            data = conn.sock.recv(self.frame_size)
        except BlockingIOError:
            return
        except ConnectionResetError:
            data = b""  # it left with frames unread: a departure like any other
        except OSError as exc:
            self._on_error(conn, f"read error: {exc.strerror}")
            return
        if len(data) == self.frame_size:
            self._on_frame(conn, data)
        elif not data:
            self._on_close(conn)
        else:
            self._on_error(conn, f"short message of {len(data)} bytes: {data.hex()}")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self._refuse_for_lack_of_fds(exc)
            return
        self._on_accept(sock)

    def _refuse_for_lack_of_fds(self, exc: OSError) -> None:
        """Out of descriptors: accept the newcomer on the spare one only to report it as
        failed; the connections already served go on."""
        if self._spare_fd is None or self._listener is None:
            raise exc
        os.close(self._spare_fd)
        self._spare_fd = None
        try:
            sock, _ = self._listener.accept()
            self._on_error(self._on_accept(sock),
                           f"no file descriptor left for it ({exc.strerror})")
        finally:
            self._spare_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def _bind(path: Path) -> socket.socket:
    """A Unix stream socket bound to ``path``; SocketInUseError if something is there."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise SocketInUseError(f"{path} exists and is not a stale socket: "
                                   f"{exc.strerror}") from None
        raise
    return listener


def _remove_stale_socket(path: Path) -> None:
    """Unlink ``path`` unless something accepts on it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUseError(f"another controller is listening on {path}")
