"""A pcapng writer (Ethernet, nanosecond timestamps) and a reader for tests.

Blocks (pcapng, IETF draft): a Section Header Block, one Interface Description Block
with link type 1 and ``if_tsresol`` 9 (timestamps count nanoseconds), then one Enhanced
Packet Block per frame with its virtual time.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

SHB = 0x0A0D0D0A
IDB = 0x00000001
EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D
LINKTYPE_ETHERNET = 1
OPT_IF_NAME = 2
OPT_IF_TSRESOL = 9


def _options(*options: tuple[int, bytes]) -> bytes:
    body = b"".join(struct.pack("<HH", code, len(value)) + _pad(value)
                    for code, value in options)
    return body + struct.pack("<HH", 0, 0)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


class PcapngWriter:
    """Frames one port saw, with their virtual instants (ns)."""

    def __init__(self, path: Path, interface: str) -> None:
        self.path = path
        self._file: BinaryIO = path.open("wb")
        self._file.write(_block(SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1)
                                + _options()))
        self._file.write(_block(IDB, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, 0)
                                + _options((OPT_IF_NAME, interface.encode()),
                                           (OPT_IF_TSRESOL, bytes([9])))))

    def write(self, time_ns: int, frame: bytes) -> None:
        header = struct.pack("<IIIII", 0, time_ns >> 32, time_ns & 0xFFFFFFFF,
                             len(frame), len(frame))
        self._file.write(_block(EPB, header + _pad(frame) + _options()))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_pcapng(path: Path) -> list[tuple[int, bytes]]:
    """``(time_ns, frame)`` of every Enhanced Packet Block in a file this module wrote."""
    data = path.read_bytes()
    packets, offset = [], 0
    while offset < len(data):
        kind, length = struct.unpack_from("<II", data, offset)
        if kind == EPB:
            _, high, low, captured, _ = struct.unpack_from("<IIIII", data, offset + 8)
            start = offset + 28
            packets.append(((high << 32) | low, data[start:start + captured]))
        offset += length
    return packets
