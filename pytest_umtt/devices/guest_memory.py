"""A kernel's memory as the vhost-user frontend shares it: regions of files, addressed
by guest address.

UML hands its whole physical memory over in VHOST_USER_SET_MEM_TABLE as one file
descriptor per region (arch/um/drivers/virtio_uml.c, vhost_user_init_mem_region): the
guest address equals the frontend's user address, and the region starts
``mmap_offset`` bytes into the file. Vring addresses and descriptor buffers are both
guest addresses.

The regions are read and written through their descriptors (pread/pwrite), never
mapped: the frontend owns the file and may shrink it at any moment, and an access to a
mapping past the end of its file is a SIGBUS that ends the whole pytest process. Through
the descriptor, a shrunk file is a short read, reported as a :class:`GuestMemoryError`.
UML's memory file (arch/um/os-Linux/mem.c, an O_TMPFILE) cannot be sealed against
shrinking, so there is no mapping that would be safe. The cost, measured on the device
benches, is in docs/DESIGN.md.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass

from ..errors import GuestMemoryError

REGION = struct.Struct("<QQQQ")
"""guest_addr, size, user_addr, mmap_offset (struct vhost_user_mem_region)."""
TABLE_HEADER = struct.Struct("<II")  # num, padding
MAX_REGIONS = 8
"""Regions per table (VHOST_MEMORY_BASELINE_NREGIONS; UML sends one or two)."""
U64_LIMIT = 1 << 64
OFFSET_LIMIT = 1 << 63  # off_t is signed


@dataclass
class Region:
    """One shared region: ``size`` bytes of the file ``fd`` from ``offset``, at guest
    address ``guest_addr``. The region owns ``fd``."""

    guest_addr: int
    size: int
    user_addr: int
    fd: int
    offset: int = 0

    def holds(self, addr: int, length: int) -> bool:
        return self.guest_addr <= addr and addr + length <= self.guest_addr + self.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class GuestMemory:
    """The regions of one VHOST_USER_SET_MEM_TABLE, read and written through their files."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def map(self, table: bytes, fds: list[int]) -> None:
        """Take the regions of a SET_MEM_TABLE payload (``u32 num, u32 pad, regions``),
        one descriptor each (kept, and closed with the region). Every descriptor is
        closed on error; a bad table raises GuestMemoryError saying what is wrong."""
        self.unmap()
        try:
            regions = _parse_table(table, len(fds))
            for (guest, size, user, offset), fd in zip(regions, fds, strict=True):
                _check_file(fd, offset, size, len(self.regions))
                self.regions.append(Region(guest, size, user, fd, offset))
        except BaseException:
            taken = {region.fd for region in self.regions}
            for fd in fds:
                if fd not in taken:
                    os.close(fd)
            self.unmap()
            raise

    def unmap(self) -> None:
        for region in self.regions:
            region.close()
        self.regions.clear()

    def locate(self, addr: int, length: int) -> tuple[int, int]:
        """The file holding ``[addr, addr + length)`` and the file offset of ``addr``."""
        for region in self.regions:
            if region.holds(addr, length):
                return region.fd, region.offset + addr - region.guest_addr
        raise GuestMemoryError(f"guest address {addr:#x}+{length} is outside the shared "
                               f"memory ({self.describe()})")

    def check(self, addr: int, length: int) -> None:
        """Raise GuestMemoryError unless ``[addr, addr + length)`` is shared memory."""
        self.locate(addr, length)

    def read(self, addr: int, length: int) -> bytes:
        fd, offset = self.locate(addr, length)
        try:
            data = os.pread(fd, length, offset) if length else b""
        except OSError as exc:
            raise GuestMemoryError(f"guest address {addr:#x}+{length}: the shared memory "
                                   f"cannot be read ({exc.strerror})") from None
        if len(data) != length:
            raise GuestMemoryError(f"guest address {addr:#x}+{length}: the shared memory file "
                                   f"ends at {os.fstat(fd).st_size:#x} (shrunk after "
                                   f"SET_MEM_TABLE)")
        return data

    def write(self, addr: int, data: bytes) -> None:
        fd, offset = self.locate(addr, len(data))
        try:
            written = os.pwrite(fd, data, offset) if data else 0
        except OSError as exc:
            raise GuestMemoryError(f"guest address {addr:#x}+{len(data)}: the shared memory "
                                   f"cannot be written ({exc.strerror})") from None
        if written != len(data):
            raise GuestMemoryError(f"guest address {addr:#x}+{len(data)}: short write to "
                                   f"the shared memory file")

    def unpack(self, layout: struct.Struct, addr: int) -> tuple[int, ...]:
        return layout.unpack(self.read(addr, layout.size))

    def pack(self, layout: struct.Struct, addr: int, *values: int) -> None:
        self.write(addr, layout.pack(*values))

    def describe(self) -> str:
        return ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.regions) or "none"


def _parse_table(table: bytes, fds: int) -> list[tuple[int, int, int, int]]:
    """The regions of a table, each checked on its own: count, sizes, alignment, range."""
    if len(table) < TABLE_HEADER.size:
        raise GuestMemoryError(f"SET_MEM_TABLE payload of {len(table)} bytes has no header")
    count, _pad = TABLE_HEADER.unpack_from(table)
    if count > MAX_REGIONS:
        raise GuestMemoryError(f"SET_MEM_TABLE names {count} regions, at most {MAX_REGIONS}")
    if count != fds:
        raise GuestMemoryError(f"SET_MEM_TABLE names {count} regions but passed {fds} "
                               f"descriptors")
    if len(table) < TABLE_HEADER.size + count * REGION.size:
        raise GuestMemoryError(f"SET_MEM_TABLE names {count} regions in a payload of "
                               f"{len(table)} bytes")
    regions = [REGION.unpack_from(table, TABLE_HEADER.size + i * REGION.size)
               for i in range(count)]
    for index, (guest, size, _user, offset) in enumerate(regions):
        _check_region(index, guest, size, offset)
    return regions


def _check_region(index: int, guest: int, size: int, offset: int) -> None:
    where = f"region {index} ({guest:#x}+{size:#x} at file offset {offset:#x})"
    if size == 0 or size % mmap.PAGESIZE or offset % mmap.PAGESIZE:
        raise GuestMemoryError(f"{where}: the size must be a non-zero multiple of the page "
                               f"size ({mmap.PAGESIZE}), the offset a multiple of it")
    if guest + size > U64_LIMIT or offset + size > OFFSET_LIMIT:
        raise GuestMemoryError(f"{where}: overflows the address or file offset range")


def _check_file(fd: int, offset: int, size: int, index: int) -> None:
    """The region's file must be a regular file open for reading and writing that holds
    the whole region now."""
    where = f"region {index}"
    try:
        info = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise GuestMemoryError(f"{where}: its descriptor is unusable ({exc.strerror})") \
            from None
    if not stat.S_ISREG(info.st_mode):
        raise GuestMemoryError(f"{where}: its descriptor is not a memory file")
    if mode != os.O_RDWR:
        raise GuestMemoryError(f"{where}: its file is not open for reading and writing")
    if info.st_size < offset + size:
        raise GuestMemoryError(f"{where}: the file has {info.st_size:#x} bytes, the region "
                               f"ends at {offset + size:#x}")
