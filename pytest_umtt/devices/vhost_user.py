"""The vhost-user backend side, as UML's ``virtio_uml`` frontend speaks it.

Message framing (header ``u32 request, u32 flags, u32 size`` and a payload, descriptors
by SCM_RIGHTS), the handshake, the memory table and the vrings; notifications are
in-band both ways (docs/DESIGN.md fact 21): the kernel kicks a queue with
VHOST_USER_VRING_KICK on the main socket and waits for the acknowledgement; the device
interrupts with VHOST_USER_SLAVE_VRING_CALL on the backend-request socket, asking for a
reply, and the calendar holds its clock until the reply came (the kernel asks to run at
the interrupt's instant before it answers).

Everything runs in the calendar's thread: the sockets are readers of its event loop,
and a kick is handled before it is acknowledged, so a device sees the kernel stopped at
the kick's virtual instant.
"""

from __future__ import annotations

import array
import contextlib
import enum
import functools
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..controller.clock import ScheduledCall
from ..controller.trace import Trace, TraceEvent
from ..errors import DeviceError, GuestMemoryError, VhostUserError
from .guest_memory import GuestMemory
from .virtqueue import VirtQueue

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_FDS = 8
"""Descriptors per message (a table of 8 regions); the kernel closes any beyond."""
MAX_PAYLOAD = 4096
"""The largest payload a message may announce; UML's largest is GET_CONFIG's."""
MAX_OUTBOX = 64 * 1024
"""Bytes of replies and interrupts waiting for a kernel that does not read them before
its device is failed. A kernel reads each reply before it sends its next request."""

F_PROTOCOL_FEATURES = 1 << 30
VIRTIO_F_VERSION_1 = 1 << 32


class Request(enum.IntEnum):
    """Frontend -> backend requests UML sends (arch/um/drivers/vhost_user.h)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    SET_VRING_ENABLE = 18
    SET_SLAVE_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25
    VRING_KICK = 35


PAYLOAD_SIZES: dict[int, int] = {
    Request.SET_FEATURES: U64.size, Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.SET_MEM_TABLE: 8, Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size, Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size, Request.SET_VRING_ENABLE: VRING_STATE.size,
    Request.GET_CONFIG: CONFIG_HEADER.size, Request.SET_CONFIG: CONFIG_HEADER.size,
    Request.VRING_KICK: VRING_STATE.size,
}
"""The payload each request needs at least (the kernel may send more: a table of two
regions when it uses one)."""


def request_name(code: int) -> str:
    """How errors name a request: its name, or its number if it has none."""
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


class BackendRequest(enum.IntEnum):
    """Backend -> frontend requests on the backend-request socket."""

    CONFIG_CHANGE = 2
    VRING_CALL = 4


class ProtocolFeature(enum.IntEnum):
    """The vhost-user protocol features UML supports; a backend offers all four."""

    REPLY_ACK = 3
    SLAVE_REQ = 5
    CONFIG = 9
    INBAND_NOTIFICATIONS = 14


PROTOCOL_FEATURES = sum(1 << feature for feature in ProtocolFeature)


class DeviceClock(Protocol):
    """What a backend needs of the calendar (:class:`~pytest_umtt.controller.Calendar`
    has it all): the clock, the event queue, the event loop and a way to hold time."""

    @property
    def trace(self) -> Trace | None: ...

    @property
    def now(self) -> int: ...

    def call_at(self, when: int, fn: Callable[[], object], name: str = "") -> ScheduledCall:
        ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_writer(self, fd: int) -> None: ...

    def hold(self, reason: str) -> Callable[[], None]: ...


class DeviceModel(Protocol):
    """What a backend needs of the model it serves (:class:`~.device.VirtioDevice` is
    one): its name in errors, its queues and features, and what it does when the driver
    acts."""

    @property
    def label(self) -> str: ...

    @property
    def num_queues(self) -> int: ...

    @property
    def features(self) -> int: ...

    def config(self) -> bytes: ...

    def on_kick(self, queue: VirtQueue) -> None: ...

    def on_queue_ready(self, queue: VirtQueue) -> None: ...

    def on_features(self, features: int) -> None: ...

    def on_config_write(self, offset: int, data: bytes) -> None: ...

    def on_disconnect(self) -> None: ...


@dataclass
class Message:
    """One vhost-user message and the descriptors that came with it (the message owns
    them: a handler that keeps one takes it out of ``fds``; the rest are closed)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def needs_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)


class MessageReader:
    """Reassembles messages from a stream socket, refusing any that announces more than
    :data:`MAX_PAYLOAD` bytes.

    Descriptors belong to the message whose bytes came with them. A Unix stream socket
    ends a read at the first chunk that carries descriptors (net/unix/af_unix.c,
    unix_stream_read_generic), so that chunk holds the last byte the read returned: its
    descriptors go to the message holding that byte, which is exactly the message a
    frontend sent them with when it sends one message per sendmsg (UML does)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._fds_at = 0  # where in the buffer the message owning _fds is

    def read(self) -> list[Message] | None:
        """The complete messages readable now; None once the peer closed; VhostUserError
        for a message too large to take."""
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                HEADER.size + MAX_PAYLOAD, socket.CMSG_SPACE(MAX_FDS * 4),
                socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return []
        except OSError:
            return None
        fds = _descriptors(ancillary)
        if not data:
            _close_all(fds)
            return None
        self._buffer += data
        if fds:
            self._take(fds)
        return self._complete()

    def _take(self, fds: list[int]) -> None:
        self._fds_at = len(self._buffer) - 1
        room = MAX_FDS - len(self._fds)
        self._fds += fds[:room]
        _close_all(fds[room:])

    def _complete(self) -> list[Message]:
        messages: list[Message] = []
        while len(self._buffer) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buffer)
            if size > MAX_PAYLOAD:
                _close_all([fd for message in messages for fd in message.fds])
                raise VhostUserError(f"{request_name(request)} announces a payload of {size} "
                                     f"bytes, more than the {MAX_PAYLOAD} any request has")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            payload = bytes(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            fds: list[int] = []
            if self._fds and self._fds_at < end:
                fds, self._fds = self._fds, []
            self._fds_at -= end
            messages.append(Message(request, flags, payload, fds))
        return messages

    def close(self) -> None:
        _close_all(self._fds)
        self._fds.clear()
        self._buffer.clear()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def frame(request: int, flags: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, flags | VERSION, len(payload)) + payload


class Sender:
    """Output to one socket that never blocks: what the socket does not take now waits,
    and goes when the socket is writable. More than :data:`MAX_OUTBOX` bytes waiting is
    ``on_overflow``; the peer gone is ``on_gone``."""

    def __init__(self, sock: socket.socket, clock: DeviceClock,
                 on_overflow: Callable[[int], None], on_gone: Callable[[], None]) -> None:
        self.sock = sock
        self.clock = clock
        self.waiting = bytearray()
        self._on_overflow = on_overflow
        self._on_gone = on_gone

    def send(self, data: bytes) -> None:
        if self.waiting:
            self.waiting += data
        else:
            self.waiting += data
            self._write()
            if self.waiting:
                self.clock.add_writer(self.sock.fileno(), self._write)
        if len(self.waiting) > MAX_OUTBOX:
            self._on_overflow(len(self.waiting))

    def _write(self) -> None:
        try:
            sent = self.sock.send(self.waiting)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            self._on_gone()
            return
        del self.waiting[:sent]
        if not self.waiting:
            self.clock.remove_writer(self.sock.fileno())

    def close(self) -> None:
        """Forget what waits (the socket is the caller's to close)."""
        if self.waiting:
            self.clock.remove_writer(self.sock.fileno())
            self.waiting.clear()


class Backend:
    """Serves one device to one kernel over a listening Unix socket.

    Everything the kernel sends is checked; whatever goes wrong in the device's work
    (the kernel broke the protocol or its rings, or the model raised) fails the device
    (:meth:`fail`): the connection is closed, :attr:`failure` says what happened, and
    ``on_failure`` hooks hear it (a machine marks itself crashed). Nothing of it reaches
    the calendar's loop, and nothing the kernel does can block it."""

    def __init__(self, device: DeviceModel, clock: DeviceClock, path: str) -> None:
        self.device = device
        self.clock = clock
        self.memory = GuestMemory()
        self.queues = [VirtQueue(index, self.memory) for index in range(device.num_queues)]
        self.features = 0
        self.connected = False
        self.failure: DeviceError | None = None
        """Why the device failed, once it did (it then serves no kernel any more)."""
        self.on_failure: list[Callable[[DeviceError], None]] = []
        self.errors: list[str] = []
        self.messages_received = 0
        self.messages_sent = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listener.bind(path)
        self.path = path
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._conn: socket.socket | None = None
        self._reader: MessageReader | None = None
        self._replies: Sender | None = None
        self._requests: socket.socket | None = None
        self._request_reader: MessageReader | None = None
        self._interrupts: Sender | None = None
        self._pending_calls: set[int] = set()
        self._deferred = self._released_early = False
        self._later: tuple[Message, bytes | None] | None = None
        self._holds: deque[Callable[[], None]] = deque()  # one per interrupt unanswered
        self._handlers = self._handler_table()
        clock.add_reader(self._listener.fileno(), self._accept)

    # --- connection -----------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._conn is not None or self.failure is not None:
            sock.close()  # one kernel per device, and none once it failed
            return
        sock.setblocking(False)
        self._conn, self._reader = sock, MessageReader(sock)
        self._replies = Sender(sock, self.clock, self._replies_overflow, self._disconnect)
        self.connected = True
        self.clock.add_reader(sock.fileno(), self._on_readable)
        self._record("connect")

    def _on_readable(self) -> None:
        assert self._reader is not None
        try:
            messages = self._reader.read()
        except VhostUserError as exc:
            self.fail("a message header", str(exc))
            return
        if messages is None:
            self._disconnect()
            return
        self.messages_received += len(messages)
        for message in messages:
            if self._conn is None:  # an earlier one failed the device
                message.close_fds()
                continue
            self.guard(request_name(message.request), functools.partial(self._handle, message))

    def _disconnect(self) -> None:
        if self._conn is None:
            return
        self._record("disconnect")
        assert self._replies is not None and self._reader is not None
        self._replies.close()
        self.clock.remove_reader(self._conn.fileno())
        self._conn.close()
        self._reader.close()
        self._drop_requests_channel()
        self._conn = self._reader = self._replies = None
        self._later = None
        self.connected = False
        self._release_holds()
        self.memory.unmap()
        for queue in self.queues:
            queue.reset()
        self.device.on_disconnect()

    def _drop_requests_channel(self) -> None:
        if self._interrupts is not None:
            self._interrupts.close()
        if self._requests is not None:
            self.clock.remove_reader(self._requests.fileno())
            self._requests.close()
        if self._request_reader is not None:
            self._request_reader.close()
        self._requests = self._request_reader = self._interrupts = None

    def close(self) -> None:
        """Stop serving: close every socket and forget the guest's memory."""
        self._disconnect()
        self.clock.remove_reader(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # --- failing --------------------------------------------------------------------

    def guard(self, what: str, action: Callable[[], object]) -> None:
        """Do device work (a request, a kick, a timer, a frame) as one go with the kernel
        stopped; any exception fails the device, named ``what``, instead of reaching
        the calendar. Nothing runs once the device failed."""
        if self.failure is not None:
            return
        for queue in self.queues:
            queue.start_batch()
        try:
            action()
        except (VhostUserError, GuestMemoryError) as exc:
            self.fail(what, str(exc), exc)
        except Exception as exc:  # a model's bug, or a test's callback that raised
            self.fail(what, f"{type(exc).__name__}: {exc}", exc)

    def fail(self, what: str, detail: str, cause: BaseException | None = None) -> None:
        """The device cannot go on: remember why, close the connection, tell the hooks."""
        if self.failure is not None:
            return
        error = DeviceError(self.device.label, what, detail, self.clock.now)
        error.__cause__ = cause
        self.failure = error
        self.errors.append(str(error))
        self._record("error", str(error))
        self._disconnect()
        for hook in self.on_failure:
            hook(error)

    def _replies_overflow(self, waiting: int) -> None:
        self.fail("a reply", f"the kernel does not read its replies ({waiting} bytes wait, "
                             f"at most {MAX_OUTBOX})")

    def _interrupts_overflow(self, waiting: int) -> None:
        self.fail("an interrupt", f"the kernel does not read its interrupts ({waiting} bytes "
                                  f"wait, at most {MAX_OUTBOX})")

    # --- requests from the kernel ---------------------------------------------------

    def _handler_table(self) -> dict[int, Callable[[Message], bytes | None]]:
        return {
            Request.GET_FEATURES: lambda _m: U64.pack(self._offered_features()),
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: lambda _m: None,
            Request.RESET_OWNER: lambda _m: None,
            Request.GET_PROTOCOL_FEATURES: lambda _m: U64.pack(PROTOCOL_FEATURES),
            Request.SET_PROTOCOL_FEATURES: lambda _m: None,
            Request.SET_SLAVE_REQ_FD: self._set_requests_channel,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.VRING_KICK: self._kick,
        }

    def _handle(self, message: Message) -> None:
        try:
            self._dispatch(message)
        finally:
            message.close_fds()  # what the handler did not take

    def _dispatch(self, message: Message) -> None:
        handler = self._handlers.get(message.request)
        if handler is None:
            raise VhostUserError("a request this device does not know")
        needed = PAYLOAD_SIZES.get(message.request, 0)
        if len(message.payload) < needed:
            raise VhostUserError(f"a payload of {len(message.payload)} bytes, the request "
                                 f"needs {needed}")
        self._deferred = self._released_early = False
        answer = handler(message)
        if self._deferred and not self._released_early:
            self._later = (message, answer)
        elif answer is not None:
            self._reply(message, answer)
        elif message.needs_reply:
            self._reply(message, U64.pack(0))

    def defer_reply(self) -> Callable[[], None]:
        """From inside a handler (a device's ``on_kick``): answer the kernel only when
        the returned function is called. The kernel stays stopped until then."""
        self._deferred = True

        def send() -> None:
            if self._later is None:  # still inside the handler: it answers as usual
                self._released_early = True
                return
            if self._conn is None:
                return
            message, answer = self._later
            self._later = None
            if answer is not None:
                self._reply(message, answer)
            elif message.needs_reply:
                self._reply(message, U64.pack(0))
        return send

    def _reply(self, message: Message, payload: bytes) -> None:
        if self._replies is None:
            return
        self.messages_sent += 1
        self._replies.send(frame(message.request, FLAG_REPLY, payload))

    def _offered_features(self) -> int:
        return self.device.features | VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES

    def _set_features(self, message: Message) -> None:
        (self.features,) = U64.unpack_from(message.payload)
        self.device.on_features(self.features)

    def _set_requests_channel(self, message: Message) -> None:
        fds = message.take_fds()
        if len(fds) != 1:
            _close_all(fds)
            raise VhostUserError(f"takes one descriptor, came with {len(fds)}")
        requests = _stream_socket(fds[0])
        self._drop_requests_channel()
        self._requests = requests
        self._request_reader = MessageReader(requests)
        self._interrupts = Sender(requests, self.clock, self._interrupts_overflow,
                                  self._requests_gone)
        self.clock.add_reader(requests.fileno(), self._on_request_reply)

    def _set_mem_table(self, message: Message) -> None:
        self.memory.map(message.payload, message.take_fds())

    def _queue(self, index: int) -> VirtQueue:
        if index >= len(self.queues):
            raise VhostUserError(f"the kernel names queue {index}, the device has "
                                 f"{len(self.queues)}")
        return self.queues[index]

    def _set_vring_num(self, message: Message) -> None:
        index, size = VRING_STATE.unpack_from(message.payload)
        self._queue(index).set_size(size)

    def _set_vring_base(self, message: Message) -> None:
        index, base = VRING_STATE.unpack_from(message.payload)
        self._queue(index).set_base(base)

    def _set_vring_addr(self, message: Message) -> None:
        index, _flags, desc, used, avail, _log = VRING_ADDR.unpack_from(message.payload)
        queue = self._queue(index)
        queue.configure(desc, used, avail)
        queue.set_enabled(True)  # no SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES
        if queue.ready:
            self.device.on_queue_ready(queue)

    def _set_vring_enable(self, message: Message) -> None:
        index, enable = VRING_STATE.unpack_from(message.payload)
        self._queue(index).set_enabled(bool(enable))

    def _get_vring_base(self, message: Message) -> bytes:
        index, _ = VRING_STATE.unpack_from(message.payload)
        queue = self._queue(index)
        queue.set_enabled(False)
        return VRING_STATE.pack(index, queue.last_avail)

    def _config_range(self, offset: int, size: int) -> bytes:
        """The config space's bytes ``[offset, offset + size)``; no more than it has."""
        space = self.device.config()
        if offset + size > len(space):
            raise VhostUserError(f"config bytes {offset}..{offset + size} asked for, the "
                                 f"config space has {len(space)}")
        return space[offset:offset + size]

    def _get_config(self, message: Message) -> bytes:
        offset, size, flags = CONFIG_HEADER.unpack_from(message.payload)
        return CONFIG_HEADER.pack(offset, size, flags) + self._config_range(offset, size)

    def _set_config(self, message: Message) -> None:
        offset, size, _flags = CONFIG_HEADER.unpack_from(message.payload)
        self._config_range(offset, size)
        data = message.payload[CONFIG_HEADER.size:CONFIG_HEADER.size + size]
        if len(data) < size:
            raise VhostUserError(f"writes {size} config bytes and carries {len(data)}")
        self.device.on_config_write(offset, data)

    def _kick(self, message: Message) -> None:
        index, _ = VRING_STATE.unpack_from(message.payload)
        queue = self._queue(index)
        self._record("kick", f"queue {index}")
        self.device.on_kick(queue)

    # --- interrupts -----------------------------------------------------------------

    def interrupt(self, queue: VirtQueue, when: int | None = None) -> None:
        """Tell the driver ``queue`` has used buffers, at ``when`` (default: now). Several
        interrupts for a queue at one instant are one."""
        if queue.index in self._pending_calls or not self.connected:
            return
        self._pending_calls.add(queue.index)
        at = self.clock.now if when is None else when
        self.clock.call_at(at, lambda: self.guard(f"interrupt of queue {queue.index}",
                                                  lambda: self._call(queue)),
                           f"{self.device.label} interrupt")

    def _call(self, queue: VirtQueue) -> None:
        self._pending_calls.discard(queue.index)
        if self._interrupts is None or not queue.wants_interrupt():
            return
        self._record("interrupt", f"queue {queue.index}")
        payload = VRING_STATE.pack(queue.index, 0)
        self.messages_sent += 1
        self._holds.append(self.clock.hold(f"{self.device.label}: waiting for the kernel "
                                           f"to take interrupt of queue {queue.index}"))
        self._interrupts.send(frame(BackendRequest.VRING_CALL, FLAG_NEED_REPLY, payload))

    def _on_request_reply(self) -> None:
        assert self._request_reader is not None
        try:
            replies = self._request_reader.read()
        except VhostUserError as exc:
            self.fail("a reply to an interrupt", str(exc))
            return
        if replies is None:
            self._requests_gone()
            return
        self.messages_received += len(replies)
        for reply in replies:
            reply.close_fds()
            self._release_hold()

    def _requests_gone(self) -> None:
        self._drop_requests_channel()
        self._release_holds()

    def _release_hold(self) -> None:
        """The kernel answered an interrupt: the oldest one (it answers in order)."""
        if self._holds:
            self._holds.popleft()()

    def _release_holds(self) -> None:
        while self._holds:
            self._holds.popleft()()

    # --- record ---------------------------------------------------------------------

    def _record(self, kind: str, detail: str = "") -> None:
        if self.clock.trace is not None:
            self.clock.trace.add(TraceEvent(self.clock.now, f"device-{kind}",
                                            self.device.label, detail=detail))


def _stream_socket(fd: int) -> socket.socket:
    """The backend-request channel the kernel passed, or VhostUserError (the descriptor
    is then closed)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        raise VhostUserError("its descriptor is not a socket") from None
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.close()
        raise VhostUserError("its descriptor is not a Unix stream socket")
    sock.setblocking(False)
    return sock
