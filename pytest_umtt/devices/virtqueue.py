"""Split virtqueues (virtio 1.x, 2.7) seen from the device side.

The driver offers descriptor chains in the available ring; the device takes them with
:meth:`VirtQueue.pop`, reads what the driver wrote, writes into the writable buffers,
and gives them back with :meth:`VirtQueue.push`. No indirect descriptors and no event
index: the devices here never offer those features.

Everything in the rings is the driver's to write, so everything is checked before use:
the size (a power of two, at most 32768), how far the available index moved (at most a
ring's worth), heads and links (inside the table, a chain no longer than the table, so a
loop ends), every buffer (inside shared memory, and at most :data:`MAX_CHAIN_BYTES` for a
device to read), and what one go of the device takes (:meth:`VirtQueue.start_batch`:
the kernel is stopped while a device works, so the chains it finds at once can use each
descriptor only once, and it reads at most :data:`MAX_BATCH_BYTES`). A chain taken
before the ring was stopped or set up anew is never given back into the new one.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import GuestMemoryError
from .guest_memory import GuestMemory

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
U16 = struct.Struct("<H")
USED_ELEM = struct.Struct("<II")  # id, len
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
"""The largest split ring (virtio 1.x, 2.7: Queue Size is at most 32768)."""
MAX_CHAIN_BYTES = 1 << 20
"""The most a device reads from one chain (1 MiB); a model may ask for less."""
MAX_BATCH_BYTES = 8 << 20
"""The most a device reads from one ring in one go (a kick, a timer: 8 MiB)."""


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
    epoch: int = 0
    """The ring's setup it was taken from (:attr:`VirtQueue.epoch`)."""
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        """Bytes the device may write."""
        return sum(buffer.length for buffer in self.writable)

    @property
    def length(self) -> int:
        """Bytes the driver wrote for the device to read."""
        return sum(buffer.length for buffer in self.readable)


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
        self.epoch = 0
        """Counts changes to the ring's setup: chains of an older one are stale."""
        self._descriptors_left = 0
        self._bytes_left = MAX_BATCH_BYTES

    def __repr__(self) -> str:
        return f"<VirtQueue {self.index} size={self.size} avail={self.last_avail}>"

    @property
    def ready(self) -> bool:
        return self.size > 0 and self.desc != 0 and self.enabled

    def start_batch(self) -> None:
        """The device starts a go (a kick, a timer) with the kernel stopped: reset what
        it may walk and read until the next."""
        self._descriptors_left = self.size
        self._bytes_left = MAX_BATCH_BYTES

    def set_size(self, size: int) -> None:
        """SET_VRING_NUM: a power of two from 1 to 32768, or GuestMemoryError."""
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise GuestMemoryError(f"queue {self.index}: size {size} is not a power of two "
                                   f"from 1 to {MAX_QUEUE_SIZE}")
        self.size = size
        self.epoch += 1
        self.start_batch()

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: where the driver's next available entry is."""
        if base > 0xFFFF:
            raise GuestMemoryError(f"queue {self.index}: base {base} is not a 16-bit index")
        self.last_avail = self.used_idx = base
        self.epoch += 1

    def set_enabled(self, enabled: bool) -> None:
        """SET_VRING_ENABLE (and GET_VRING_BASE, which stops the ring)."""
        self.enabled = enabled
        self.epoch += 1

    def reset(self) -> None:
        """The kernel went away: the ring is no more (a kernel that comes back sets it
        up anew)."""
        self.size = self.desc = self.avail = self.used = 0
        self.last_avail = self.used_idx = 0
        self.enabled = False
        self.epoch += 1

    def configure(self, desc: int, used: int, avail: int) -> None:
        self.desc, self.used, self.avail = desc, used, avail
        self.epoch += 1

    def pending(self) -> int:
        """Chains the driver offered that the device has not taken yet."""
        if not self.ready:
            return 0
        (avail_idx,) = self.memory.unpack(U16, self.avail + 2)
        offered = (avail_idx - self.last_avail) & 0xFFFF
        if offered > self.size:
            raise GuestMemoryError(f"queue {self.index}: the available index moved from "
                                   f"{self.last_avail} to {avail_idx}, more than the "
                                   f"ring's {self.size} entries")
        return offered

    def pop(self) -> Chain | None:
        """The next offered chain, or None."""
        if self.pending() == 0:
            return None
        slot = self.last_avail % self.size
        (head,) = self.memory.unpack(U16, self.avail + 4 + 2 * slot)
        if head >= self.size:
            raise GuestMemoryError(f"queue {self.index}: head {head} is outside the "
                                   f"{self.size}-entry descriptor table")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        chain = Chain(head, self.epoch)
        index = head
        for _ in range(self.size):  # a chain longer than the table loops
            self._descriptors_left -= 1
            if self._descriptors_left < 0:
                raise GuestMemoryError(f"queue {self.index}: the chains offered at once use "
                                       f"more descriptors than the {self.size}-entry table")
            addr, length, flags, following = self.memory.unpack(DESC, self.desc + 16 * index)
            if flags & DESC_F_INDIRECT:
                raise GuestMemoryError(f"queue {self.index}: indirect descriptor (not offered)")
            self.memory.check(addr, length)
            writable = bool(flags & DESC_F_WRITE)
            (chain.writable if writable else chain.readable).append(
                Buffer(addr, length, writable))
            if not flags & DESC_F_NEXT:
                return chain
            if following >= self.size:
                raise GuestMemoryError(f"queue {self.index}: descriptor {index} of the chain "
                                       f"from {head} links to {following}, outside the table")
            index = following
        raise GuestMemoryError(f"queue {self.index}: the descriptor chain from {head} loops "
                               f"(longer than the {self.size}-entry table)")

    def read(self, chain: Chain, limit: int = MAX_CHAIN_BYTES) -> bytes:
        """Everything the driver wrote in the chain's readable buffers; GuestMemoryError
        if that is more than ``limit`` bytes."""
        if chain.length > limit:
            raise GuestMemoryError(f"queue {self.index}: the chain from {chain.head} holds "
                                   f"{chain.length} bytes to read, more than the {limit} "
                                   f"the device takes")
        self._bytes_left -= chain.length
        if self._bytes_left < 0:
            raise GuestMemoryError(f"queue {self.index}: the chains offered at once hold more "
                                   f"than the {MAX_BATCH_BYTES} bytes a device reads in one go")
        return b"".join(self.memory.read(b.addr, b.length) for b in chain.readable)

    def write(self, chain: Chain, data: bytes) -> int:
        """Fill the chain's writable buffers with ``data``; bytes written (what fits;
        nothing for a chain of a ring stopped or set up anew since it was taken)."""
        if not self.current(chain):
            return 0
        written = 0
        for buffer in chain.writable:
            piece = data[written:written + buffer.length]
            if not piece:
                break
            self.memory.write(buffer.addr, piece)
            written += len(piece)
        return written

    def push(self, chain: Chain, written: int) -> None:
        """Give a chain back to the driver with ``written`` bytes in its buffers (unless
        the ring was stopped or set up anew since: the driver took its buffers back)."""
        if not self.current(chain):
            return
        slot = self.used_idx % self.size
        self.memory.pack(USED_ELEM, self.used + 4 + 8 * slot, chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.pack(U16, self.used + 2, self.used_idx)

    def current(self, chain: Chain) -> bool:
        """Whether ``chain`` belongs to the ring as it is now, and the ring runs."""
        return chain.epoch == self.epoch and self.ready

    def notify_me(self, wanted: bool) -> None:
        """Ask the driver to kick when it offers buffers, or not (VRING_USED_F_NO_NOTIFY):
        a device that has nothing to put in them needs no kick, and each costs a message
        and its acknowledgement."""
        if self.ready:
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
        """False while the driver suppresses interrupts (VRING_AVAIL_F_NO_INTERRUPT),
        or the ring does not run."""
        if not self.ready:
            return False
        (flags,) = self.memory.unpack(U16, self.avail)
        return not flags & AVAIL_F_NO_INTERRUPT
