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
import os
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..controller.clock import ScheduledCall
from ..controller.trace import Trace, TraceEvent
from ..errors import UmttError
from .guest_memory import GuestMemory
from .virtqueue import VirtQueue

if TYPE_CHECKING:
    from .device import VirtioDevice

HEADER = struct.Struct("<III")
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
VERSION = 0x1
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_FDS = 8
MAX_MESSAGE = 4096

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


class VhostUserError(UmttError):
    """The frontend broke the protocol; the message names the device and the request."""


class DeviceClock(Protocol):
    """What a backend needs of the calendar (:class:`~pytest_umtt.controller.Calendar`
    has it all): the clock, the event queue, the event loop and a way to hold time."""

    trace: Trace | None

    @property
    def now(self) -> int: ...

    def call_at(self, when: int, fn: Callable[[], object], name: str = "") -> ScheduledCall:
        ...

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None: ...

    def remove_reader(self, fd: int) -> None: ...

    def hold(self, reason: str) -> Callable[[], None]: ...


@dataclass
class Message:
    """One vhost-user message and the descriptors that came with it."""

    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def needs_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)


class MessageReader:
    """Reassembles messages from a stream socket; descriptors attach to the message
    whose first bytes they came with."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []

    def read(self) -> list[Message] | None:
        """The complete messages readable now; None once the peer closed."""
        try:
            data, ancillary, _flags, _addr = self.sock.recvmsg(
                MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4))
        except BlockingIOError:
            return []
        except ConnectionResetError:
            return None
        if not data:
            return None
        self._fds.extend(_descriptors(ancillary))
        self._buffer += data
        return list(self._complete())

    def _complete(self) -> list[Message]:
        messages = []
        while len(self._buffer) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(self._buffer)
            if len(self._buffer) < HEADER.size + size:
                break
            payload = bytes(self._buffer[HEADER.size:HEADER.size + size])
            del self._buffer[:HEADER.size + size]
            fds, self._fds = self._fds, []
            messages.append(Message(request, flags, payload, fds))
        return messages

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(array.array("i", data[:usable]))
    return fds


def frame(request: int, flags: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, flags | VERSION, len(payload)) + payload


def _send_whole(sock: socket.socket, data: bytes) -> bool:
    """Send a message the kernel waits for (a few dozen bytes: blocking is brief);
    False when the kernel is gone."""
    sock.setblocking(True)
    try:
        sock.sendall(data)
    except OSError:
        return False
    finally:
        sock.setblocking(False)
    return True


class Backend:
    """Serves one device to one kernel over a listening Unix socket."""

    def __init__(self, device: VirtioDevice, clock: DeviceClock, path: str) -> None:
        self.device = device
        self.clock = clock
        self.memory = GuestMemory()
        self.queues = [VirtQueue(index, self.memory) for index in range(device.num_queues)]
        self.features = 0
        self.connected = False
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
        self._requests: socket.socket | None = None
        self._request_reader: MessageReader | None = None
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
        if self._conn is not None:
            sock.close()  # one kernel per device
            return
        sock.setblocking(False)
        self._conn, self._reader = sock, MessageReader(sock)
        self.connected = True
        self.clock.add_reader(sock.fileno(), self._on_readable)
        self._record("connect")

    def _on_readable(self) -> None:
        assert self._reader is not None
        messages = self._reader.read()
        if messages is None:
            self._disconnect()
            return
        self.messages_received += len(messages)
        for message in messages:
            self._handle(message)

    def _disconnect(self) -> None:
        self._record("disconnect")
        if self._conn is not None:
            self.clock.remove_reader(self._conn.fileno())
            self._conn.close()
        if self._reader is not None:
            self._reader.close()
        self._drop_requests_channel()
        self._conn = self._reader = None
        self.connected = False
        self._release_holds()
        self.memory.unmap()
        self.device.on_disconnect()

    def _drop_requests_channel(self) -> None:
        if self._requests is not None:
            self.clock.remove_reader(self._requests.fileno())
            self._requests.close()
        if self._request_reader is not None:
            self._request_reader.close()
        self._requests = self._request_reader = None

    def close(self) -> None:
        """Stop serving: close every socket and unmap the guest's memory."""
        if self._conn is not None:
            self._disconnect()
        self.clock.remove_reader(self._listener.fileno())
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

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
        handler = self._handlers.get(message.request)
        if handler is None:
            self._fail(f"unsupported request {message.request}")
            for fd in message.fds:
                os.close(fd)
            if message.needs_reply:
                self._reply(message, U64.pack(1))
            return
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
        assert self._conn is not None
        self.messages_sent += 1
        if not _send_whole(self._conn, frame(message.request, FLAG_REPLY, payload)):
            self._disconnect()

    def _offered_features(self) -> int:
        return self.device.features | VIRTIO_F_VERSION_1 | F_PROTOCOL_FEATURES

    def _set_features(self, message: Message) -> None:
        (self.features,) = U64.unpack_from(message.payload)
        self.device.on_features(self.features)

    def _set_requests_channel(self, message: Message) -> None:
        self._drop_requests_channel()
        (fd, *extra) = message.fds
        for spare in extra:
            os.close(spare)
        self._requests = socket.socket(fileno=fd)
        self._requests.setblocking(False)
        self._request_reader = MessageReader(self._requests)
        self.clock.add_reader(fd, self._on_request_reply)

    def _set_mem_table(self, message: Message) -> None:
        self.memory.map(message.payload, message.fds)

    def _queue(self, index: int) -> VirtQueue:
        if index >= len(self.queues):
            raise VhostUserError(f"{self.device.label}: the kernel names queue {index}, the "
                                 f"device has {len(self.queues)}")
        return self.queues[index]

    def _set_vring_num(self, message: Message) -> None:
        index, size = VRING_STATE.unpack_from(message.payload)
        self._queue(index).size = size

    def _set_vring_base(self, message: Message) -> None:
        index, base = VRING_STATE.unpack_from(message.payload)
        queue = self._queue(index)
        queue.last_avail = queue.used_idx = base

    def _set_vring_addr(self, message: Message) -> None:
        index, _flags, desc, used, avail, _log = VRING_ADDR.unpack_from(message.payload)
        queue = self._queue(index)
        queue.configure(desc, used, avail)
        queue.enabled = True  # no SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES
        self.device.on_queue_ready(queue)

    def _set_vring_enable(self, message: Message) -> None:
        index, enable = VRING_STATE.unpack_from(message.payload)
        self._queue(index).enabled = bool(enable)

    def _get_vring_base(self, message: Message) -> bytes:
        index, _ = VRING_STATE.unpack_from(message.payload)
        queue = self._queue(index)
        queue.enabled = False
        return VRING_STATE.pack(index, queue.last_avail)

    def _get_config(self, message: Message) -> bytes:
        offset, size, flags = CONFIG_HEADER.unpack_from(message.payload)
        space = self.device.config().ljust(offset + size, b"\0")[offset:offset + size]
        return CONFIG_HEADER.pack(offset, size, flags) + space

    def _set_config(self, message: Message) -> None:
        offset, size, _flags = CONFIG_HEADER.unpack_from(message.payload)
        self.device.on_config_write(offset, message.payload[CONFIG_HEADER.size:][:size])

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
        self.clock.call_at(at, lambda: self._call(queue), f"{self.device.label} interrupt")

    def _call(self, queue: VirtQueue) -> None:
        self._pending_calls.discard(queue.index)
        if self._requests is None or not queue.wants_interrupt():
            return
        self._record("interrupt", f"queue {queue.index}")
        payload = VRING_STATE.pack(queue.index, 0)
        self.messages_sent += 1
        if not _send_whole(self._requests, frame(BackendRequest.VRING_CALL, FLAG_NEED_REPLY,
                                                 payload)):
            self._disconnect()
            return
        self._holds.append(self.clock.hold(f"{self.device.label}: waiting for the kernel "
                                           f"to take interrupt of queue {queue.index}"))

    def _on_request_reply(self) -> None:
        assert self._request_reader is not None
        replies = self._request_reader.read()
        if replies is None:
            self._drop_requests_channel()
            self._release_holds()
            return
        self.messages_received += len(replies)
        for _reply in replies:
            self._release_hold()

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

    def _fail(self, detail: str) -> None:
        self.errors.append(detail)
        self._record("error", detail)
