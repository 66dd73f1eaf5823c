"""Wire format and shared-memory layout of UML's ``time-travel=ext`` protocol.

Pure data, no I/O. Everything here comes from include/uapi/linux/um_timetravel.h
(Linux 6.12); section numbers refer to PROTOCOL.md.
"""

from __future__ import annotations

import enum
import mmap
import struct
from dataclasses import dataclass

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


def op_name(op: int) -> str:
    """Name of an opcode, or its number for one the protocol does not define."""
    try:
        return Op(op).name
    except ValueError:
        return f"op{op}"


@dataclass(frozen=True, slots=True)
class Message:
    """One 16-byte protocol message; ``op`` stays an int so unknown ops survive decoding."""

    op: int
    seq: int
    time: int

    def pack(self) -> bytes:
        """Encode to the 16-byte wire form."""
        return _MESSAGE.pack(self.op, self.seq, self.time & U64_MAX)

    @classmethod
    def unpack(cls, data: bytes) -> Message:
        """Decode exactly 16 bytes; anything else is a caller error."""
        op, seq, time = _MESSAGE.unpack(data)
        return cls(op, seq, time)

    def __str__(self) -> str:
        return f"{op_name(self.op)}(seq={self.seq}, time={self.time})"


# --- shared memory, version 2 (§2) -------------------------------------------------

SHM_VERSION = 2
SHM_HEADER_SIZE = 4096
SHM_ENTRY_SIZE = 128

_U16 = struct.Struct("=H")
_ENTRY_HEAD = struct.Struct("=IIQ")  # capa, flags, req_time: one read on the hot path
_U32 = struct.Struct("=I")
_U64 = struct.Struct("=Q")

# Header offsets.
_VERSION, _LEN, _FREE_UNTIL, _CURRENT_TIME, _RUNNING_ID, _MAX_CLIENTS = 0, 4, 8, 16, 24, 26
# Client entry offsets, relative to the entry.
_CAPA, _FLAGS, _REQ_TIME, _NAME = 0, 4, 8, 16


def shm_size(entries: int) -> int:
    """Bytes needed for a header plus ``entries`` client entries (entry 0 is the controller's)."""
    return SHM_HEADER_SIZE + SHM_ENTRY_SIZE * entries


class SharedMemory:
    """Typed access to a schedshm mapping. Does not own the mapping's lifetime."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self._buf = buffer

    def _get(self, fmt: struct.Struct, offset: int) -> int:
        value: int = fmt.unpack_from(self._buf, offset)[0]
        return value

    def _put(self, fmt: struct.Struct, offset: int, value: int) -> None:
        fmt.pack_into(self._buf, offset, value)

    def init_header(self, entries: int) -> None:
        """Write the header as the controller does once at creation (§2)."""
        self._put(_U32, _VERSION, SHM_VERSION)
        self._put(_U32, _LEN, shm_size(entries))
        self._put(_U16, _MAX_CLIENTS, entries)

    @property
    def version(self) -> int:
        return self._get(_U32, _VERSION)

    @property
    def length(self) -> int:
        return self._get(_U32, _LEN)

    @property
    def max_clients(self) -> int:
        return self._get(_U16, _MAX_CLIENTS)

    @property
    def free_until(self) -> int:
        return self._get(_U64, _FREE_UNTIL)

    @free_until.setter
    def free_until(self, value: int) -> None:
        self._put(_U64, _FREE_UNTIL, min(value, U64_MAX))

    @property
    def current_time(self) -> int:
        return self._get(_U64, _CURRENT_TIME)

    @current_time.setter
    def current_time(self, value: int) -> None:
        self._put(_U64, _CURRENT_TIME, value)

    @property
    def running_id(self) -> int:
        return self._get(_U16, _RUNNING_ID)

    @running_id.setter
    def running_id(self, value: int) -> None:
        self._put(_U16, _RUNNING_ID, value)

    def pending_request(self, client_id: int) -> int | None:
        """The client's req_time if its REQ_RUN flag is set (the scheduler's hot path)."""
        _, flags, req_time = _ENTRY_HEAD.unpack_from(
            self._buf, SHM_HEADER_SIZE + SHM_ENTRY_SIZE * client_id)
        return req_time if flags & ClientFlag.REQ_RUN.value else None

    def entry(self, client_id: int) -> ShmEntry:
        """The entry of client ``client_id``."""
        return ShmEntry(self, SHM_HEADER_SIZE + SHM_ENTRY_SIZE * client_id)


class ShmEntry:
    """One client's 128-byte entry in shared memory."""

    def __init__(self, shm: SharedMemory, base: int) -> None:
        self._shm = shm
        self._base = base

    @property
    def capa(self) -> Capability:
        return Capability(self._shm._get(_U32, self._base + _CAPA))

    @capa.setter
    def capa(self, value: int) -> None:
        self._shm._put(_U32, self._base + _CAPA, value)

    @property
    def flags(self) -> ClientFlag:
        return ClientFlag(self._shm._get(_U32, self._base + _FLAGS))

    @flags.setter
    def flags(self, value: int) -> None:
        self._shm._put(_U32, self._base + _FLAGS, value)

    @property
    def req_time(self) -> int:
        return self._shm._get(_U64, self._base + _REQ_TIME)

    @req_time.setter
    def req_time(self, value: int) -> None:
        self._shm._put(_U64, self._base + _REQ_TIME, value)

    @property
    def name(self) -> int:
        return self._shm._get(_U64, self._base + _NAME)

    @name.setter
    def name(self, value: int) -> None:
        self._shm._put(_U64, self._base + _NAME, value)

    def clear(self) -> None:
        """Zero the entry, as on a client's removal (§3 Removal)."""
        self._shm._buf[self._base : self._base + SHM_ENTRY_SIZE] = bytes(SHM_ENTRY_SIZE)
