"""Device models: small Python classes behind a vhost-user backend.

A model says what it is (``device_id``, ``num_queues``, feature bits, config space) and
what it does when the driver kicks a queue. It runs on the calendar's clock: a kick
reaches :meth:`VirtioDevice.on_kick` at the kick's virtual instant with the kernel
stopped, and whatever the model answers later it answers with :meth:`call_at`, so a
device's timing is exact and a seed decides everything it draws.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import ClassVar

from ..controller.clock import ScheduledCall
from ..errors import DeviceError, DeviceNotServedError
from ..units import ns_to_seconds, warn_unit_changed
from .vhost_user import Backend, DeviceClock
from .virtqueue import VirtQueue


class VirtioDevice:
    """Base of the device models. Subclasses set ``device_id`` (virtio 1.x, 5) and
    ``num_queues``, and override :meth:`on_kick` (and :meth:`config` if the device
    has a config space)."""

    device_id: ClassVar[int]
    num_queues: ClassVar[int]
    features: int = 0
    """Device feature bits offered (VIRTIO_F_VERSION_1 is always added)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.label = name
        """How traces and errors name it: ``machine/name`` once a machine serves it."""
        self.backend: Backend | None = None
        self.random = random.Random(name)

    def __repr__(self) -> str:
        state = "connected" if self.backend and self.backend.connected else "idle"
        return f"<{type(self).__name__} {self.name} {state}>"

    # --- what a model overrides -----------------------------------------------------

    def config(self) -> bytes:
        """The device's config space (virtio 1.x, 4.x per device type)."""
        return b""

    def on_kick(self, queue: VirtQueue) -> None:
        """The driver offered buffers on ``queue``; the kernel waits until this returns."""

    def on_queue_ready(self, queue: VirtQueue) -> None:
        """The driver set ``queue``'s rings up (before offering buffers on it)."""

    def on_features(self, features: int) -> None:
        """The driver acknowledged these feature bits."""

    def on_config_write(self, offset: int, data: bytes) -> None:
        """The driver wrote ``data`` into the config space at ``offset``."""

    def on_disconnect(self) -> None:
        """The kernel went away (it stopped, or crashed)."""

    # --- what a model uses ----------------------------------------------------------

    def serve(self, clock: DeviceClock, path: str, seed: int, label: str | None = None
              ) -> Backend:
        """Listen at ``path`` for the kernel, on ``clock``; draw from ``seed``."""
        self.random.seed(f"{seed}/{self.name}")
        self.label = label or self.name
        self.backend = Backend(self, clock, path)
        return self.backend

    @property
    def clock(self) -> DeviceClock:
        if self.backend is None:
            raise DeviceNotServedError(f"device {self.name} has no clock: no machine serves "
                                       f"it yet")
        return self.backend.clock

    @property
    def now_ns(self) -> int:
        """Virtual time in nanoseconds, exact (what a model computes with)."""
        return self.clock.now

    @property
    def now(self) -> float:
        """Virtual time in seconds (it used to be nanoseconds: the first use in a
        process warns, :class:`~pytest_umtt.units.UnitChangedWarning`)."""
        warn_unit_changed("VirtioDevice.now", "VirtioDevice.now_ns")
        return ns_to_seconds(self.clock.now)

    def call_at(self, when_ns: int, fn: Callable[[], object]) -> ScheduledCall:
        """Run ``fn`` at virtual time ``when_ns`` on the shared clock, as device work:
        whatever it raises fails the device (:meth:`guard`)."""
        return self.clock.call_at(when_ns, lambda: self.guard("a timer", fn), self.label)

    def guard(self, what: str, action: Callable[[], object]) -> None:
        """Do ``action`` as device work: an exception fails the device (the machine
        serving it is marked crashed) instead of reaching the caller; nothing runs once
        the device failed. ``what`` names the work in the error."""
        if self.backend is None:
            action()
        else:
            self.backend.guard(what, action)

    @property
    def failure(self) -> DeviceError | None:
        """Why the device failed, if it did."""
        return None if self.backend is None else self.backend.failure

    def interrupt(self, queue: VirtQueue, when_ns: int | None = None) -> None:
        """Interrupt the driver for ``queue`` at ``when_ns`` (default now)."""
        if self.backend is not None:
            self.backend.interrupt(queue, when_ns)

    def queue(self, index: int) -> VirtQueue:
        if self.backend is None:
            raise DeviceNotServedError(f"device {self.name} has no queue {index}: no machine "
                                       f"serves it yet")
        return self.backend.queues[index]

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
