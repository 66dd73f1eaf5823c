"""virtio-console (virtio 1.x, 5.3), one port: a byte stream both ways, as /dev/hvc0.

Guest -> host: the driver's put_chars() kicks the transmit queue and then spins until
the buffer comes back used (drivers/char/virtio_console.c, __send_to_port), so the
buffers are taken and returned inside the kick, before it is acknowledged, and what the
guest wrote is handed on at the kick's virtual instant. Host -> guest: :meth:`send`
fills the receive buffers the driver posted and interrupts at the current instant;
what does not fit waits for the driver's next buffers.
"""

from __future__ import annotations

from collections.abc import Callable

from .device import VirtioDevice
from .virtqueue import VirtQueue

DEVICE_ID_CONSOLE = 3
RECEIVE_QUEUE = 0
TRANSMIT_QUEUE = 1


class VirtioConsole(VirtioDevice):
    """A console port whose other end is Python: ``on_receive(data)`` gets what the
    guest writes (at the instant it writes it), :meth:`send` types into the guest."""

    device_id = DEVICE_ID_CONSOLE
    num_queues = 2

    def __init__(self, name: str = "console",
                 on_receive: Callable[[bytes], None] | None = None) -> None:
        super().__init__(name)
        self.on_receive = on_receive
        self.received = bytearray()
        self._outgoing = bytearray()
        self.kicks = 0
        self.interrupts = 0

    def send(self, data: bytes) -> None:
        """Hand ``data`` to the guest now (it reads it at this virtual instant)."""
        self._outgoing += data
        if self.backend is not None and self.backend.connected:
            self.guard("send", lambda: self._deliver(self.queue(RECEIVE_QUEUE)))

    def on_kick(self, queue: VirtQueue) -> None:
        self.kicks += 1
        if queue.index == TRANSMIT_QUEUE:
            self._take(queue)
        else:
            self._deliver(queue)  # new receive buffers: anything waiting goes now

    def on_queue_ready(self, queue: VirtQueue) -> None:
        if queue.index == RECEIVE_QUEUE:
            # The driver posts its receive buffers one kick each (256 at probe): none is
            # needed while nothing waits to go in.
            queue.notify_me(False)

    def on_disconnect(self) -> None:
        self._outgoing.clear()

    def _take(self, queue: VirtQueue) -> None:
        data = bytearray()
        while (chain := queue.pop()) is not None:
            data += queue.read(chain)
            queue.push(chain, 0)
        if not data:
            return
        if self.on_receive is None:
            self.received += data
        else:
            self.on_receive(bytes(data))

    def _deliver(self, queue: VirtQueue) -> None:
        if queue.feed(self._fill, lambda: bool(self._outgoing)):
            self.interrupts += 1
            self.interrupt(queue)

    def _fill(self, queue: VirtQueue) -> bool:
        delivered = False
        while self._outgoing and (chain := queue.pop()) is not None:
            written = queue.write(chain, bytes(self._outgoing))
            del self._outgoing[:written]
            queue.push(chain, written)
            delivered = True
        return delivered
