"""virtio-net ports on a simulated switch: Ethernet between machines in virtual time.

A :class:`Network` is a learning switch. Every port pair is a link with a latency, a
bandwidth (frames queue per direction, so a transfer takes as long as its bytes need),
a loss probability drawn from the network's seeded generator, and a state (cut or not);
each frame's fate and arrival instant are decided on the calendar's clock when the
sending kernel kicks its transmit queue. With ``capture`` every port writes what it sent
and received to ``PORT.pcapng`` with virtual timestamps.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ..controller.perturb import Decisions
from ..units import either, ns_to_seconds
from .device import VirtioDevice
from .pcapng import PcapngWriter
from .virtqueue import VirtQueue

DEVICE_ID_NET = 1
F_MAC = 1 << 5
HEADER_SIZE = 12  # struct virtio_net_hdr_v1 (VIRTIO_F_VERSION_1)
RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1
MAX_WAITING = 256
"""Frames waiting for a port's receive buffers (or for its rings, at boot)."""
MAX_IN_FLIGHT = 4096
"""Frames on their way to one port (sent, not arrived yet); more are dropped, as a
switch's full buffer drops them."""
MIN_FRAME = 14  # destination, source, type
MAX_FRAME = 1518
"""The longest frame carried: a 1500-byte MTU, its Ethernet header and a VLAN tag."""
BROADCAST = b"\xff" * 6


LINK_FIELDS = ("latency_ns", "bandwidth_bps", "loss", "reorder", "reorder_delay_ns")
LINK_SECONDS = {"latency": "latency_ns", "reorder_delay": "reorder_delay_ns"}
"""The link's times a caller may give in seconds, and the field each sets exactly."""


@dataclass
class Link:
    """One port pair's properties; ``busy_until`` is per direction (serialisation). A
    frame is lost with probability ``loss``; with probability ``reorder`` it is held
    ``reorder_delay_ns`` longer, so frames sent after it overtake it."""

    latency_ns: int = 0
    bandwidth_bps: int | None = None
    loss: float = 0.0
    reorder: float = 0.0
    reorder_delay_ns: int = 0
    cut: bool = False

    def __post_init__(self) -> None:
        self.busy_until: dict[str, int] = {}

    @property
    def latency(self) -> float:
        """The one-way latency in seconds (``latency_ns`` exact)."""
        return ns_to_seconds(self.latency_ns)

    @property
    def reorder_delay(self) -> float:
        """How much longer a reordered frame is held, in seconds."""
        return ns_to_seconds(self.reorder_delay_ns)

    @property
    def reorder_ns(self) -> int:
        """The older name of ``reorder_delay_ns``."""
        return self.reorder_delay_ns


def _link_changes(changes: dict[str, int | float | None]) -> dict[str, int | float | None]:
    """``Network.link``'s keywords as Link fields: times in seconds made exact, and
    every time checked (a time given both ways is an error naming it)."""
    if "reorder_ns" in changes:  # the older name, same meaning
        changes["reorder_delay_ns"] = changes.pop("reorder_ns")
    unknown = sorted(set(changes) - set(LINK_FIELDS) - set(LINK_SECONDS))
    if unknown:
        raise TypeError(f"a link has no {unknown[0]!r}")
    fields = {name: value for name, value in changes.items()
              if name in LINK_FIELDS and name not in LINK_SECONDS.values()}
    for seconds, exact in LINK_SECONDS.items():
        if seconds in changes or exact in changes:
            fields[exact] = either(seconds, changes.get(seconds),
                                   changes.get(exact))  # type: ignore[arg-type]
    return fields


class VirtioNet(VirtioDevice):
    """One machine's network interface (``eth0`` in the guest), a port of ``network``."""

    device_id = DEVICE_ID_NET
    num_queues = 2
    features = F_MAC

    def __init__(self, network: Network, port: str) -> None:
        super().__init__(f"net-{port}")
        self.network = network
        self.port = port
        self.mac = bytes([0x52, 0x54]) + hashlib.sha256(port.encode()).digest()[:4]
        self._waiting: deque[bytes] = deque()
        self.dropped = 0
        """Frames for this port it had no room for, or no kernel to take them."""
        self.invalid = 0
        """Frames its guest sent that no Ethernet carries (under 14 or over 1518 bytes):
        dropped."""
        self.in_flight = 0
        self.capture: PcapngWriter | None = None

    def config(self) -> bytes:
        return self.mac

    def on_queue_ready(self, queue: VirtQueue) -> None:
        if queue.index == RECEIVE_QUEUE:
            # The driver refills without kicking unless frames wait (they may have come
            # before the rings were set up: they go into the first buffers).
            queue.notify_me(bool(self._waiting))

    def on_kick(self, queue: VirtQueue) -> None:
        if queue.index == TRANSMIT_QUEUE:
            self._transmit(queue)
        else:
            self._fill(queue)

    def on_disconnect(self) -> None:
        self._waiting.clear()

    def _transmit(self, queue: VirtQueue) -> None:
        sent = False
        while (chain := queue.pop()) is not None:
            sent = True
            if not MIN_FRAME <= chain.length - HEADER_SIZE <= MAX_FRAME:
                self.invalid += 1  # not read at all: it could be gigabytes
                queue.push(chain, 0)
                continue
            frame = queue.read(chain)[HEADER_SIZE:]
            queue.push(chain, 0)
            self._record(frame)
            self.network.forward(self, frame)
        if sent:
            self.interrupt(queue)  # the driver frees what it sent on this interrupt

    def receive(self, frame: bytes) -> None:
        """A frame arrives now: into the next receive buffer, or waiting for one (also
        while the kernel has not set its rings up yet). Whatever goes wrong fails this
        port's device, never the sender's."""
        if self.backend is None or not self.backend.connected:
            self.dropped += 1
            return
        self._record(frame)
        if len(self._waiting) >= MAX_WAITING:
            self.dropped += 1
            return
        self._waiting.append(frame)
        self.guard("frame delivery", lambda: self._fill(self.queue(RECEIVE_QUEUE)))

    def _fill(self, queue: VirtQueue) -> None:
        if queue.feed(self._put_waiting, lambda: bool(self._waiting)):
            self.interrupt(queue)

    def _put_waiting(self, queue: VirtQueue) -> bool:
        delivered = False
        while self._waiting and (chain := queue.pop()) is not None:
            header = bytes(10) + (1).to_bytes(2, "little")  # num_buffers = 1
            queue.push(chain, queue.write(chain, header + self._waiting.popleft()))
            delivered = True
        return delivered

    def _record(self, frame: bytes) -> None:
        if self.capture is not None and self.backend is not None:
            self.capture.write(self.now_ns, frame)


class Network:
    """A switch: ports by name, links between them, all fates drawn from ``seed``.
    ``decisions`` records each loss and reordering the draws make and may revert some
    (:class:`~pytest_umtt.controller.perturb.Decisions`: shrinking a failing run)."""

    def __init__(self, seed: int = 0, *, latency: float | None = None,
                 latency_ns: int | None = None, bandwidth_bps: int | None = None,
                 capture: Path | None = None, decisions: Decisions | None = None) -> None:
        self.random = random.Random(f"network/{seed}")
        self.decisions = Decisions() if decisions is None else decisions
        self.default = Link(either("latency", latency, latency_ns) or 0, bandwidth_bps)
        self.capture = capture
        self.ports: dict[str, VirtioNet] = {}
        self.links: dict[frozenset[str], Link] = {}
        self.macs: dict[bytes, str] = {}
        self.lost = 0

    def port(self, name: str) -> VirtioNet:
        """A new port (a machine's virtio-net device):
        ``umtt_machine_factory(name, devices=[...])``."""
        if name in self.ports:
            raise ValueError(f"port {name!r} exists already")
        device = VirtioNet(self, name)
        if self.capture is not None:
            self.capture.mkdir(parents=True, exist_ok=True)
            device.capture = PcapngWriter(self.capture / f"{name}.pcapng", name)
        self.ports[name] = device
        return device

    def link(self, a: str, b: str, **changes: int | float | None) -> Link:
        """The link between ports ``a`` and ``b`` (both directions), with the given
        :class:`Link` fields changed: ``latency`` (seconds) or ``latency_ns``,
        ``bandwidth_bps``, ``loss``, ``reorder``, and ``reorder_delay`` (seconds) or
        ``reorder_delay_ns`` (``reorder_ns``, its older name, works too)."""
        link = self.links.setdefault(frozenset((a, b)), Link(
            self.default.latency_ns, self.default.bandwidth_bps))
        for name, value in _link_changes(dict(changes)).items():
            setattr(link, name, value)
        return link

    def cut(self, a: str, b: str, *, at: float | None = None, at_ns: int | None = None
            ) -> None:
        """Drop every frame between ``a`` and ``b`` from virtual time ``at`` (seconds;
        or ``at_ns``, exact; default: now)."""
        self._set_cut(a, b, True, either("at", at, at_ns))

    def heal(self, a: str, b: str, *, at: float | None = None, at_ns: int | None = None
             ) -> None:
        """Carry frames between ``a`` and ``b`` again from ``at`` (seconds; or ``at_ns``,
        exact; default: now)."""
        self._set_cut(a, b, False, either("at", at, at_ns))

    def _set_cut(self, a: str, b: str, state: bool, at_ns: int | None) -> None:
        link = self.link(a, b)
        if at_ns is None:
            link.cut = state
            return
        clock = self.ports[a].clock
        clock.call_at(at_ns, lambda: setattr(link, "cut", state), f"network {a}-{b}")

    def forward(self, sender: VirtioNet, frame: bytes) -> None:
        """Switch a frame the sender's kernel just sent, at this instant."""
        self.macs[frame[6:12]] = sender.port
        target = self.macs.get(frame[:6]) if frame[:6] != BROADCAST else None
        targets = [target] if target else [p for p in self.ports if p != sender.port]
        for name in targets:
            self._carry(sender, self.ports[name], frame)

    def _carry(self, sender: VirtioNet, receiver: VirtioNet, frame: bytes) -> None:
        link = self.link(sender.port, receiver.port)
        route = f"{sender.port}>{receiver.port}"
        if link.cut or (link.loss and self.random.random() < link.loss
                        and self.decisions.decide("drop", route, sender.now_ns, len(frame))):
            self.lost += 1
            return
        now = sender.now_ns
        start = max(now, link.busy_until.get(sender.port, 0))
        wire = 0 if link.bandwidth_bps is None else \
            -(-len(frame) * 8 * 1_000_000_000 // link.bandwidth_bps)
        link.busy_until[sender.port] = start + wire
        held = link.reorder_delay_ns if link.reorder and self.random.random() < link.reorder \
            and self.decisions.decide("reorder", route, now, link.reorder_delay_ns) else 0
        if receiver.in_flight >= MAX_IN_FLIGHT:
            receiver.dropped += 1
            return
        receiver.in_flight += 1
        sender.call_at(start + wire + link.latency_ns + held, lambda: self._arrive(receiver, frame))

    def _arrive(self, receiver: VirtioNet, frame: bytes) -> None:
        receiver.in_flight -= 1
        receiver.receive(frame)

    def close(self) -> None:
        for port in self.ports.values():
            if port.capture is not None:
                port.capture.close()
