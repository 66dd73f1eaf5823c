"""A hostile vhost-user frontend: the kernel's side of a device's socket, sending
whatever a test or the fuzzer tells it to. Any message (any header, any payload, any
descriptors), any memory table over memfds it owns, any ring contents written straight
into that memory, any interrupt answered or not.

The backend it talks to runs in the same process, on a calendar the test pumps
(``pump``): every send that would block pumps instead, so a frontend and its backend in
one thread never deadlock.
"""

from __future__ import annotations

import array
import contextlib
import importlib
import mmap
import os
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from pytest_umtt.controller import Calendar, Trace
from pytest_umtt.devices import VirtioDevice
from pytest_umtt.devices.vhost_user import (
    CONFIG_HEADER,
    FLAG_NEED_REPLY,
    HEADER,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_STATE,
    Request,
)
from pytest_umtt.devices.virtqueue import DESC, U16, USED_ELEM

REGION = struct.Struct("<QQQQ")
PAGE = 4096


class GuestRam:
    """The frontend's memory: ``size`` bytes of a memfd at guest address ``base``."""

    def __init__(self, size: int = 1 << 20, base: int = 0x100000) -> None:
        self.size, self.base = size, base
        self.fd = os.memfd_create("hostile-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)

    def write(self, addr: int, data: bytes) -> None:
        """Write what falls inside the memory (never growing the file past its size)."""
        start, end = max(addr, self.base), min(addr + len(data), self.base + self.size)
        if start < end:
            os.pwrite(self.fd, data[start - addr:end - addr], start - self.base)

    def read(self, addr: int, length: int) -> bytes:
        return os.pread(self.fd, length, addr - self.base)

    def shrink(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def region(self) -> tuple[int, int, int, int]:
        """(guest_addr, size, user_addr, offset) of the whole memory."""
        return self.base, self.size, self.base, 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Ring:
    """The driver's side of a split ring laid out at ``base`` in ``ram``: descriptors,
    the available ring, the used ring, then room for buffers."""

    def __init__(self, ram: GuestRam, base: int, size: int) -> None:
        self.ram, self.size = ram, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.buffers = (self.used + 6 + 8 * size + PAGE - 1) & ~(PAGE - 1)
        self.avail_idx = 0
        self.seen_used = 0

    def descriptor(self, index: int, addr: int, length: int, flags: int = 0,
                   following: int = 0) -> None:
        self.ram.write(self.desc + 16 * index, DESC.pack(addr, length, flags, following))

    def offer(self, head: int) -> None:
        """Put ``head`` in the next available slot and publish it."""
        self.ram.write(self.avail + 4 + 2 * (self.avail_idx % self.size), U16.pack(head))
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.ram.write(self.avail + 2, U16.pack(self.avail_idx))

    def used_idx(self) -> int:
        (index,) = U16.unpack(self.ram.read(self.used + 2, 2))
        return int(index)

    def take_used(self) -> list[tuple[int, int]]:
        """(head, length) of each chain the device gave back since the last look."""
        entries = []
        while self.seen_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.seen_used % self.size)
            entries.append(USED_ELEM.unpack(self.ram.read(slot, 8)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return [(int(head), int(length)) for head, length in entries]


class HostileFrontend:
    """One connection to a backend's socket at ``path``."""

    def __init__(self, path: str, pump: Callable[[], None]) -> None:
        self.pump = pump
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.requests: socket.socket | None = None  # our end of the backend-request channel
        self.replies: list[tuple[int, int, bytes]] = []
        self._incoming = b""
        self._calls = b""
        self.interrupts = 0
        self.closed = False
        pump()

    # --- sending ----------------------------------------------------------------------

    def raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` with ``fds`` attached to its first bytes, pumping the backend
        whenever the socket is full."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
            if fds else []
        view = memoryview(data)
        for _ in range(100_000):
            try:
                sent = self.sock.sendmsg([view], ancillary)
            except BlockingIOError:
                self.pump()
                continue
            except OSError:
                self.closed = True
                return
            view, ancillary = view[sent:], []
            if not view:
                break
        self.pump()

    def send(self, request: int, payload: bytes = b"", *, flags: int = 0,
             fds: Sequence[int] = (), size: int | None = None) -> None:
        """One message; ``size`` overrides the header's payload size (a lie)."""
        header = HEADER.pack(request, flags | VERSION, len(payload) if size is None else size)
        self.raw(header + payload, fds)

    def state(self, request: int, index: int, value: int, flags: int = 0) -> None:
        self.send(request, VRING_STATE.pack(index, value), flags=flags)

    # --- receiving --------------------------------------------------------------------

    def drain(self) -> None:
        """Read every reply waiting (noting when the backend closed the connection)."""
        buffer = self._incoming
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            buffer += data
        while len(buffer) >= HEADER.size:
            request, flags, size = HEADER.unpack_from(buffer)
            if len(buffer) < HEADER.size + size:
                break
            self.replies.append((request, flags, buffer[HEADER.size:HEADER.size + size]))
            buffer = buffer[HEADER.size + size:]
        self._incoming = buffer

    def answer_interrupts(self) -> int:
        """Acknowledge every VRING_CALL the backend sent; how many there were."""
        if self.requests is None:
            return 0
        with contextlib.suppress(BlockingIOError, ConnectionResetError):
            while data := self.requests.recv(4096):
                self._calls += data
        answered = 0
        while len(self._calls) >= HEADER.size:
            request, _flags, size = HEADER.unpack_from(self._calls)
            if len(self._calls) < HEADER.size + size:
                break
            self._calls = self._calls[HEADER.size + size:]
            with contextlib.suppress(OSError):
                self.requests.send(HEADER.pack(request, 0x4 | VERSION, 8) + U64.pack(0))
            answered += 1
        self.interrupts += answered
        return answered

    def is_closed(self) -> bool:
        """Whether the backend closed the connection."""
        self.pump()
        self.drain()
        return self.closed

    # --- a well-behaved start ---------------------------------------------------------

    def handshake(self, ram: GuestRam | None, *, requests_channel: bool = True) -> None:
        """What UML sends at probe: features, the backend-request channel, the memory."""
        self.send(Request.GET_FEATURES)
        self.send(Request.SET_FEATURES, U64.pack(1 << 32 | 1 << 30))
        self.send(Request.GET_PROTOCOL_FEATURES)
        self.send(Request.SET_PROTOCOL_FEATURES, U64.pack(1 << 3 | 1 << 5 | 1 << 9 | 1 << 14))
        if requests_channel:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setblocking(False)
            self.requests = ours
            self.send(Request.SET_SLAVE_REQ_FD, fds=[theirs.fileno()])
            theirs.close()
        if ram is not None:
            self.mem_table([ram.region()], [ram.fd])

    def mem_table(self, regions: Sequence[tuple[int, int, int, int]], fds: Sequence[int],
                  count: int | None = None) -> None:
        payload = struct.pack("<II", len(regions) if count is None else count, 0)
        payload += b"".join(REGION.pack(*region) for region in regions)
        self.send(Request.SET_MEM_TABLE, payload, fds=fds)

    def setup_queue(self, index: int, ring: Ring) -> None:
        self.state(Request.SET_VRING_NUM, index, ring.size)
        self.state(Request.SET_VRING_BASE, index, 0)
        self.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, ring.desc, ring.used,
                                                          ring.avail, 0))

    def kick(self, index: int) -> None:
        self.state(Request.VRING_KICK, index, 0, flags=FLAG_NEED_REPLY)

    def get_config(self, offset: int, size: int) -> None:
        self.send(Request.GET_CONFIG, CONFIG_HEADER.pack(offset, size, 0) + bytes(min(size, 256)))

    def close(self) -> None:
        self.sock.close()
        if self.requests is not None:
            self.requests.close()
            self.requests = None


class Served:
    """A device served on its own calendar at ``directory``, a hostile frontend connected
    to it, and the frontend's memory. ``pump`` does everything the calendar can do now,
    answering interrupts as a kernel would (unless ``answer`` is False)."""

    def __init__(self, device: VirtioDevice, directory: Path, ram_size: int = 1 << 20,
                 label: str = "hostile") -> None:
        self.calendar = Calendar(trace=Trace())
        self.device = device
        self.answer = True
        self.path = str(directory / f"{device.name}.sock")
        device.serve(self.calendar, self.path, seed=0, label=f"{label}/{device.name}")
        self.ram = GuestRam(ram_size)
        self.frontend: HostileFrontend | None = None
        self.frontend = HostileFrontend(self.path, self.pump)

    def pump(self) -> None:
        for _ in range(10_000):
            while self.calendar.step(0):
                pass
            if not (self.answer and self.frontend and self.frontend.answer_interrupts()):
                return

    def ring(self, index: int, size: int = 8, at: int = 0x10000) -> Ring:
        """A ring in the frontend's memory, set up on queue ``index``."""
        assert self.frontend is not None
        ring = Ring(self.ram, self.ram.base + at, size)
        self.frontend.setup_queue(index, ring)
        return ring

    def close(self) -> None:
        if self.frontend is not None:
            self.frontend.close()
        self.device.close()
        self.calendar.close()
        self.ram.close()


def mapped_access() -> tuple[dict[str, object], dict[str, object]]:
    """GuestMemory's accessors as they are, and through mappings of the region files:
    for benches that measure what reading through the descriptor costs, or that check
    the fuzzer finds the SIGBUS a mapping allows. Never for a real run."""
    memory = importlib.import_module("pytest_umtt.devices.guest_memory").GuestMemory
    names = ("read", "write", "unpack", "pack", "unmap")
    through_fd: dict[str, object] = {name: getattr(memory, name) for name in names}
    views: dict[int, mmap.mmap] = {}

    def view(fd: int) -> mmap.mmap:
        if fd not in views:
            views[fd] = mmap.mmap(fd, 0)
        return views[fd]

    def read(self: object, addr: int, length: int) -> bytes:
        fd, offset = self.locate(addr, length)  # type: ignore[attr-defined]
        return view(fd)[offset:offset + length]

    def write(self: object, addr: int, data: bytes) -> None:
        fd, offset = self.locate(addr, len(data))  # type: ignore[attr-defined]
        view(fd)[offset:offset + len(data)] = data

    def unpack(self: object, layout: struct.Struct, addr: int) -> tuple[int, ...]:
        fd, offset = self.locate(addr, layout.size)  # type: ignore[attr-defined]
        return layout.unpack_from(view(fd), offset)

    def pack(self: object, layout: struct.Struct, addr: int, *values: int) -> None:
        fd, offset = self.locate(addr, layout.size)  # type: ignore[attr-defined]
        layout.pack_into(view(fd), offset, *values)

    def unmap(self: object) -> None:
        for mapping in views.values():
            mapping.close()
        views.clear()
        through_fd["unmap"](self)  # type: ignore[operator]  # GuestMemory.unmap

    mapped: dict[str, object] = {"read": read, "write": write, "unpack": unpack, "pack": pack,
                                 "unmap": unmap}
    return through_fd, mapped
