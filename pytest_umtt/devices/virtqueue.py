"""Split virtqueues (virtio 1.x, 2.7) seen from the device side.

The driver offers descriptor chains in the available ring; the device takes them with
:meth:`VirtQueue.pop`, reads what the driver wrote, writes into the writable buffers,
and gives them back with :meth:`VirtQueue.push`. No indirect descriptors and no event
index: the devices here never offer those features.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .guest_memory import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1


@dataclass
class Buffer:
    """One descriptor: ``length`` bytes at guest address ``addr``."""

    addr: int
    length: int
    writable: bool


@dataclass
class Chain:
    """A descriptor chain the driver offered: what to read, then where to write."""

    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        """Bytes the device may write."""
        return sum(buffer.length for buffer in self.writable)


class VirtQueue:
    """One split virtqueue of a device, once the driver set its size and addresses."""

    def __init__(self, index: int, memory: GuestMemory) -> None:
        self.index = index
        self.memory = memory
        self.size = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.enabled = False

    def __repr__(self) -> str:
        return f"<VirtQueue {self.index} size={self.size} avail={self.last_avail}>"

    @property
    def ready(self) -> bool:
        return self.size > 0 and self.desc != 0 and self.enabled

    def configure(self, desc: int, used: int, avail: int) -> None:
        self.desc, self.used, self.avail = desc, used, avail

    def pending(self) -> int:
        """Chains the driver offered that the device has not taken yet."""
        if not self.ready:
            return 0
        (avail_idx,) = self.memory.unpack(U16, self.avail + 2)
        return (avail_idx - self.last_avail) & 0xFFFF

    def pop(self) -> Chain | None:
        """The next offered chain, or None."""
        if self.pending() == 0:
            return None
        slot = self.last_avail % self.size
        (head,) = self.memory.unpack(U16, self.avail + 4 + 2 * slot)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        chain = Chain(head)
        index, seen = head, 0
        while True:
            addr, length, flags, following = self.memory.unpack(DESC, self.desc + 16 * index)
            if flags & DESC_F_INDIRECT:
                raise GuestMemoryError(f"queue {self.index}: indirect descriptor (not offered)")
            writable = bool(flags & DESC_F_WRITE)
            (chain.writable if writable else chain.readable).append(
                Buffer(addr, length, writable))
            seen += 1
            if not flags & DESC_F_NEXT:
                return chain
            if seen >= self.size or following >= self.size:
                raise GuestMemoryError(f"queue {self.index}: descriptor chain from {head} "
                                       f"loops or leaves the table")
            index = following

    def read(self, chain: Chain) -> bytes:
        """Everything the driver wrote in the chain's readable buffers."""
        return b"".join(self.memory.read(b.addr, b.length) for b in chain.readable)

    def write(self, chain: Chain, data: bytes) -> int:
        """Fill the chain's writable buffers with ``data``; bytes written (what fits)."""
        written = 0
        for buffer in chain.writable:
            piece = data[written:written + buffer.length]
            if not piece:
                break
            self.memory.write(buffer.addr, piece)
            written += len(piece)
        return written

    def push(self, chain: Chain, written: int) -> None:
        """Give a chain back to the driver with ``written`` bytes in its buffers."""
        slot = self.used_idx % self.size
        self.memory.pack(USED_ELEM, self.used + 4 + 8 * slot, chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.pack(U16, self.used + 2, self.used_idx)

    def notify_me(self, wanted: bool) -> None:
        """Ask the driver to kick when it offers buffers, or not (VRING_USED_F_NO_NOTIFY):
        a device that has nothing to put in them needs no kick, and each costs a message
        and its acknowledgement."""
        self.memory.pack(U16, self.used, 0 if wanted else USED_F_NO_NOTIFY)

    def feed(self, fill: Callable[[VirtQueue], bool], waiting: Callable[[], bool]) -> bool:
        """Put what waits for the driver into its buffers with ``fill`` (True if it put
        anything). While something still waits, ask for the driver's kicks (and look
        again, in case a buffer came meanwhile); once nothing does, the driver refills
        without kicking. True if anything was delivered."""
        delivered = fill(self)
        if waiting():
            self.notify_me(True)
            delivered |= fill(self)
        if not waiting():
            self.notify_me(False)
        return delivered

    def wants_interrupt(self) -> bool:
        """False while the driver suppresses interrupts (VRING_AVAIL_F_NO_INTERRUPT)."""
        (flags,) = self.memory.unpack(U16, self.avail)
        return not flags & AVAIL_F_NO_INTERRUPT
