"""A kernel's memory as the vhost-user frontend shares it: mapped regions, addressed
by guest address.

UML hands its whole physical memory over in VHOST_USER_SET_MEM_TABLE as one file
descriptor per region (arch/um/drivers/virtio_uml.c, vhost_user_init_mem_region): the
guest address equals the frontend's user address, and the region starts
``mmap_offset`` bytes into the file. Vring addresses and descriptor buffers are both
guest addresses.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from ..errors import UmttError

REGION = struct.Struct("<QQQQ")
"""guest_addr, size, user_addr, mmap_offset (struct vhost_user_mem_region)."""


class GuestMemoryError(UmttError):
    """The frontend pointed at memory it did not share: a device bug or a broken guest."""


@dataclass
class Region:
    """One shared region, mapped."""

    guest_addr: int
    size: int
    user_addr: int
    view: mmap.mmap

    def holds(self, addr: int, length: int) -> bool:
        return self.guest_addr <= addr and addr + length <= self.guest_addr + self.size


class GuestMemory:
    """The regions of one VHOST_USER_SET_MEM_TABLE, mapped read-write."""

    def __init__(self) -> None:
        self.regions: list[Region] = []

    def map(self, table: bytes, fds: list[int]) -> None:
        """Map the regions of a SET_MEM_TABLE payload (``u32 num, u32 pad, regions``),
        one descriptor each; the descriptors are closed (the mappings stay)."""
        self.unmap()
        count = struct.unpack_from("<I", table)[0]
        try:
            if count != len(fds):
                raise GuestMemoryError(f"SET_MEM_TABLE names {count} regions but passed "
                                       f"{len(fds)} descriptors")
            for index, fd in enumerate(fds):
                guest, size, user, offset = REGION.unpack_from(table, 8 + index * REGION.size)
                view = mmap.mmap(fd, size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
                self.regions.append(Region(guest, size, user, view))
        finally:
            for fd in fds:
                os.close(fd)

    def unmap(self) -> None:
        for region in self.regions:
            region.view.close()
        self.regions.clear()

    def locate(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        """The mapping holding ``[addr, addr + length)`` and the offset of ``addr`` in it."""
        for region in self.regions:
            if region.holds(addr, length):
                return region.view, addr - region.guest_addr
        raise GuestMemoryError(f"guest address {addr:#x}+{length} is outside the shared "
                               f"memory ({self.describe()})")

    def read(self, addr: int, length: int) -> bytes:
        view, offset = self.locate(addr, length)
        return view[offset:offset + length]

    def write(self, addr: int, data: bytes) -> None:
        view, offset = self.locate(addr, len(data))
        view[offset:offset + len(data)] = data

    def unpack(self, layout: struct.Struct, addr: int) -> tuple[int, ...]:
        view, offset = self.locate(addr, layout.size)
        return layout.unpack_from(view, offset)

    def pack(self, layout: struct.Struct, addr: int, *values: int) -> None:
        view, offset = self.locate(addr, layout.size)
        layout.pack_into(view, offset, *values)

    def describe(self) -> str:
        return ", ".join(f"{r.guest_addr:#x}+{r.size:#x}" for r in self.regions) or "none"
