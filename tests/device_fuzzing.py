"""Random hostile frontends for the device models: hypothesis strategies and a player.

An input is a device type and a list of actions a kernel's side can take: any message
(known or unknown request, any flags, any payload, a lying size, descriptors attached),
memory tables good and bad, rings of any size set up anywhere, descriptors and available
entries written straight into memory, kicks, shrinking the memory file, enabling and
disabling rings, config reads, interrupts left unanswered; and what the host side does
meanwhile (frames arriving, console input, GPIO lines driven). :func:`play` runs one and
checks that nothing escaped the device: no exception out of the calendar, and the
device either still serving or failed with a DeviceError; every descriptor is back.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from hypothesis import strategies as st

from pytest_umtt.devices import Network, VirtioDevice, VirtioGpio, VirtioRng
from pytest_umtt.devices.console import VirtioConsole
from pytest_umtt.devices.vhost_user import VRING_ADDR, Request
from pytest_umtt.errors import DeviceError
from tests.hostile_frontend import HostileFrontend, Ring, Served

Action = tuple[object, ...]
RAM = 1 << 20
LAYOUT_MAX = 256  # rings are laid out for at most this many entries, whatever size is sent


def _net() -> VirtioDevice:
    network = Network()
    port = network.port("a")
    network.port("b")  # somewhere for frames to go
    return port


DEVICES: dict[str, Callable[[], VirtioDevice]] = {
    "console": VirtioConsole, "rng": VirtioRng, "gpio": lambda: VirtioGpio(4), "net": _net,
}

_u32 = st.one_of(st.integers(0, 16), st.sampled_from([255, 256, 4096, 32768, 32769, 65535,
                                                      65536, 2**31, 2**32 - 1]),
                 st.integers(0, 2**32 - 1))
_queue = st.integers(0, 2)
_requests = st.one_of(st.sampled_from(list(Request)), st.integers(0, 64),
                      st.just(2**32 - 1))
_addr_kinds = st.sampled_from(["buffer", "ring", "outside", "zero", "top", "straddle"])

messages = st.tuples(st.just("message"), _requests, st.integers(0, 15),
                     st.binary(max_size=80), st.integers(0, 3),
                     st.one_of(st.none(), _u32))
tables = st.tuples(st.just("table"), st.sampled_from(
    ["good", "count", "offset", "huge", "readonly", "pipe", "short", "two"]))
rings = st.tuples(st.just("ring"), _queue, st.one_of(st.sampled_from([1, 2, 4, 8, 256]), _u32),
                  st.integers(0, 65535))
descriptors = st.tuples(st.just("desc"), _queue, st.integers(0, 20), _addr_kinds,
                        st.tuples(st.one_of(st.integers(0, 4096), _u32), st.integers(0, 7),
                                  st.integers(0, 40)))
offers = st.tuples(st.just("offer"), _queue, st.one_of(st.integers(0, 20), _u32))
avails = st.tuples(st.just("avail"), _queue, st.integers(0, 65535))
pokes = st.tuples(st.just("poke"), st.integers(0, RAM - 1), st.binary(min_size=1, max_size=64))
kicks = st.tuples(st.just("kick"), _queue)
shrinks = st.tuples(st.just("shrink"), st.integers(0, RAM))
enables = st.tuples(st.just("enable"), _queue, st.integers(0, 2))
configs = st.tuples(st.just("config"), _u32, _u32)
host_side = st.tuples(st.just("host"), st.binary(max_size=2000), st.integers(0, 3),
                      st.integers(0, 1))
silences = st.tuples(st.just("silence"), st.booleans())

actions = st.one_of(messages, tables, rings, descriptors, offers, avails, pokes, kicks,
                    kicks, shrinks, enables, configs, host_side, silences)
inputs = st.tuples(st.sampled_from(sorted(DEVICES)),
                   st.lists(actions, max_size=40))


class Player:
    """One input played against one device: the frontend's rings as it set them up."""

    def __init__(self, device: str, directory: Path) -> None:
        self.served = Served(DEVICES[device](), directory, RAM)
        self.rings: dict[int, Ring] = {}
        self.fds_before = 0

    @property
    def peer(self) -> HostileFrontend:
        assert self.served.frontend is not None
        return self.served.frontend

    def ring(self, queue: int) -> Ring:
        if queue not in self.rings:
            self.rings[queue] = Ring(self.served.ram, self.served.ram.base + 0x10000 * (queue + 1),
                                     8)
        return self.rings[queue]

    def act(self, action: Action) -> None:
        getattr(self, f"_{action[0]}")(*action[1:])

    def _message(self, request: int, flags: int, payload: bytes, fds: int,
                 size: int | None) -> None:
        copies = [os.dup(self.served.ram.fd) for _ in range(fds)]
        self.peer.send(request, payload, flags=flags, fds=copies,
                       size=None if size is None else min(size, 2**32 - 1))
        for fd in copies:
            os.close(fd)

    def _table(self, kind: str) -> None:
        ram = self.served.ram
        base, size, user, offset = ram.region()
        regions, fds, count = [(base, size, user, offset)], [os.dup(ram.fd)], None
        if kind == "count":
            count = 2
        elif kind == "offset":
            regions = [(base, size - 4096, user, 100)]
        elif kind == "huge":
            regions = [(base, 1 << 63, user, 4096)]
        elif kind == "readonly":
            os.close(fds[0])
            fds = [os.open(f"/proc/self/fd/{ram.fd}", os.O_RDONLY | os.O_CLOEXEC)]
        elif kind == "pipe":
            os.close(fds[0])
            read_end, write_end = os.pipe()
            os.close(write_end)
            fds = [read_end]
        elif kind == "short":
            regions = [(base, size // 2, user, 0)]
        elif kind == "two":
            regions.append((base + size, size, user + size, 0))
            fds.append(os.dup(ram.fd))
        self.peer.mem_table(regions, fds, count)
        for fd in fds:
            os.close(fd)

    def _ring(self, queue: int, size: int, base: int) -> None:
        layout = Ring(self.served.ram, self.served.ram.base + 0x10000 * (queue + 1),
                      max(1, min(size, LAYOUT_MAX)))
        self.rings[queue] = layout
        self.peer.state(Request.SET_VRING_NUM, queue, size)
        self.peer.state(Request.SET_VRING_BASE, queue, base)
        layout.avail_idx = layout.seen_used = base & 0xFFFF
        self.peer.send(Request.SET_VRING_ADDR, VRING_ADDR.pack(
            queue, 0, layout.desc, layout.used, layout.avail, 0))

    def _desc(self, queue: int, index: int, kind: str, fields: tuple[int, int, int]) -> None:
        length, flags, following = fields
        ring, ram = self.ring(queue), self.served.ram
        addr = {"buffer": ring.buffers, "ring": ring.desc, "outside": ram.base - 4096,
                "zero": 0, "top": 2**64 - 16, "straddle": ram.base + ram.size - 8}[kind]
        if index < ring.size:
            ring.descriptor(index, addr, length, flags, following)

    def _offer(self, queue: int, head: int) -> None:
        self.ring(queue).offer(head & 0xFFFF)

    def _avail(self, queue: int, index: int) -> None:
        self.ring(queue).set_avail_idx(index)

    def _poke(self, offset: int, data: bytes) -> None:
        self.served.ram.write(self.served.ram.base + offset, data)

    def _kick(self, queue: int) -> None:
        self.peer.kick(queue)

    def _shrink(self, size: int) -> None:
        self.served.ram.shrink(size)

    def _enable(self, queue: int, value: int) -> None:
        self.peer.state(Request.SET_VRING_ENABLE, queue, value)

    def _config(self, offset: int, size: int) -> None:
        self.peer.get_config(offset, size)

    def _host(self, data: bytes, line: int, value: int) -> None:
        device = self.served.device
        if isinstance(device, VirtioConsole):
            device.send(data)
        elif isinstance(device, VirtioGpio):
            device.drive(line, value)
        elif hasattr(device, "receive"):
            device.receive(data)  # a frame from the other port, of any length

    def _silence(self, answer: bool) -> None:
        self.served.answer = answer

    def finish(self) -> dict[str, int]:
        """Run what is due, check the device, close everything; counts of what happened."""
        self.served.pump()
        device = self.served.device
        failure = device.failure
        assert failure is None or isinstance(failure, DeviceError)
        closed = self.peer.is_closed()
        if failure is not None:
            assert closed, "a failed device closes its connection"
        self.served.close()
        return {"failed": int(failure is not None), "closed": int(closed)}


def play(device: str, steps: list[Action]) -> dict[str, int]:
    """Play one input; raises (AssertionError or whatever escaped) when something is wrong."""
    fds = len(os.listdir("/proc/self/fd"))
    with tempfile.TemporaryDirectory(prefix="umtt-fuzz-") as directory:
        player = Player(device, Path(directory))
        try:
            player.peer.handshake(player.served.ram)
            for step in steps:
                player.act(step)
            counts = player.finish()
        finally:
            player.served.close()
    after = len(os.listdir("/proc/self/fd"))
    assert after == fds, f"{after - fds} descriptors more than before the input"
    counts["actions"] = len(steps)
    return counts
