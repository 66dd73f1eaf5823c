"""Wire format and shared-memory layout of UML's ``time-travel=ext`` protocol.

Pure data, no I/O. Everything here comes from include/uapi/linux/um_timetravel.h
(Linux 6.12); section numbers refer to PROTOCOL.md.
"""

from __future__ import annotations

import enum
import mmap
import struct
from typing import NamedTuple

MESSAGE_SIZE = 16
"""Every message is ``u32 op, u32 seq, u64 time`` in native byte order (§1)."""

NO_ID = 2**64 - 1
"""START carries this when the kernel was given no ``ext:ID:`` (§1)."""

U64_MAX = 2**64 - 1
S64_MAX = 2**63 - 1
"""A kernel with nothing to do requests S64_MAX; a RUN at or past it panics (§4)."""

FREE_RUN_SPAN = 2**62
"""Horizon granted when nothing else is pending, as the reference controller does (§3)."""

START_ACK_ID_MASK = 0xFFFF
"""Only the low 16 bits of the START ACK's time are the client id (§1 step 5)."""

_MESSAGE = struct.Struct("=IIQ")

pack_message = _MESSAGE.pack
"""``pack_message(op, seq, time)``: the 16-byte wire form, without making a
:class:`Message` first (the calendar's hot path); ``time`` must already fit in a u64."""


class Op(enum.IntEnum):
    """Message opcodes (H:enum um_timetravel_ops)."""

    ACK = 0
    START = 1
    REQUEST = 2
    WAIT = 3
    GET = 4
    UPDATE = 5
    RUN = 6
    FREE_UNTIL = 7
    GET_TOD = 8
    BROADCAST = 9


class Capability(enum.IntFlag):
    """Client capabilities written into its shared-memory entry (§2)."""

    TIME_SHARE = 0x1


class ClientFlag(enum.IntFlag):
    """Per-client request flags in shared memory (§2)."""

    REQ_RUN = 0x1


_OP_NAMES = {op.value: op.name for op in Op}


def op_name(op: int) -> str:
    """Name of an opcode, or its number for one the protocol does not define."""
    name = _OP_NAMES.get(op)
    return f"op{op}" if name is None else name


class Message(NamedTuple):
    """One 16-byte protocol message; ``op`` stays an int so unknown ops survive decoding.
    A named tuple rather than a dataclass: one is made per message on the hot path."""

    op: int
    seq: int
    time: int

    def pack(self) -> bytes:
        """Encode to the 16-byte wire form."""
        return _MESSAGE.pack(self.op, self.seq, self.time & U64_MAX)

    @classmethod
    def unpack(cls, data: bytes) -> Message:
        """Decode exactly 16 bytes; anything else is a caller error."""
        return cls._make(_MESSAGE.unpack(data))

    def __str__(self) -> str:
        return f"{op_name(self.op)}(seq={self.seq}, time={self.time})"


# --- shared memory, version 2 (§2) -------------------------------------------------

SHM_VERSION = 2
SHM_HEADER_SIZE = 4096
SHM_ENTRY_SIZE = 128

_ENTRY_HEAD = struct.Struct("=IIQ")  # capa, flags, req_time: one read on the hot path
_REQUESTS: dict[int, struct.Struct] = {}  # flags and req_time of entries 1..n, by n


def shm_size(entries: int) -> int:
    """Bytes needed for a header plus ``entries`` client entries (entry 0 is the controller's)."""
    return SHM_HEADER_SIZE + SHM_ENTRY_SIZE * entries


class _View:
    """A window on the mapping: the header (base 0) or one client entry."""

    def __init__(self, buffer: mmap.mmap, base: int = 0) -> None:
        self._buf = buffer
        self._base = base


class _Field:
    """One unsigned field of the layout; values past its width saturate."""

    def __init__(self, fmt: str, offset: int) -> None:
        self._struct = struct.Struct("=" + fmt)
        self._offset = offset
        self._max = 2 ** (8 * self._struct.size) - 1

    def __get__(self, view: _View, owner: object = None) -> int:
        value: int = self._struct.unpack_from(view._buf, view._base + self._offset)[0]
        return value

    def __set__(self, view: _View, value: int) -> None:
        if value > self._max:  # noqa: PLR1730 (a comparison is cheaper than min())
            value = self._max
        self._struct.pack_into(view._buf, view._base + self._offset, value)


class SharedMemory(_View):
    """Typed access to a schedshm mapping (header at offset 0, H:um_timetravel_schedshm).
    Does not own the mapping's lifetime."""

    version = _Field("I", 0)
    length = _Field("I", 4)
    free_until = _Field("Q", 8)
    current_time = _Field("Q", 16)
    running_id = _Field("H", 24)
    max_clients = _Field("H", 26)

    def init_header(self, entries: int) -> None:
        """Write the header as the controller does once at creation (§2)."""
        self.version = SHM_VERSION
        self.length = shm_size(entries)
        self.max_clients = entries

    def pending_request(self, client_id: int) -> int | None:
        """The client's req_time if its REQ_RUN flag is set (the scheduler's hot path)."""
        _, flags, req_time = _ENTRY_HEAD.unpack_from(
            self._buf, SHM_HEADER_SIZE + SHM_ENTRY_SIZE * client_id)
        return req_time if flags & ClientFlag.REQ_RUN.value else None

    def requests(self, last_id: int) -> tuple[int, ...]:
        """flags and req_time of entries 1..``last_id``, flattened, in one read (the
        scheduler collects them at every WAIT)."""
        reader = _REQUESTS.get(last_id)
        if reader is None:
            reader = _REQUESTS[last_id] = struct.Struct("=" + "4xIQ112x" * last_id)
        return reader.unpack_from(self._buf, SHM_HEADER_SIZE + SHM_ENTRY_SIZE)

    def entry(self, client_id: int) -> ShmEntry:
        """The entry of client ``client_id``."""
        return ShmEntry(self._buf, SHM_HEADER_SIZE + SHM_ENTRY_SIZE * client_id)


class ShmEntry(_View):
    """One client's 128-byte entry (H:um_timetravel_schedshm_client)."""

    capa = _Field("I", 0)
    flags = _Field("I", 4)
    req_time = _Field("Q", 8)
    name = _Field("Q", 16)

    def post_request(self, when: int) -> None:
        """Set req_time and REQ_RUN, as a kernel does for a request (K:284-286)."""
        self.req_time = when
        self.flags = self.flags | ClientFlag.REQ_RUN

    def clear(self) -> None:
        """Zero the entry, as on a client's removal (§3 Removal)."""
        self._buf[self._base : self._base + SHM_ENTRY_SIZE] = bytes(SHM_ENTRY_SIZE)
