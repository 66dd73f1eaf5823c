"""Devices on the virtual clock: vhost-user backends that UML kernels drive through
their real virtio drivers (``virtio_uml``).

Layers, bottom up: :mod:`.guest_memory` (the kernel's shared memory),
:mod:`.virtqueue` (split rings), :mod:`.vhost_user` (the protocol, on any
:class:`~.vhost_user.DeviceClock`, which the calendar is), :mod:`.device` (the model
base class), then the models. Nothing here knows of machines or the plugin.
"""

from ..errors import VhostUserError
from .device import VirtioDevice
from .gpio import VirtioGpio
from .net import Network, VirtioNet
from .rng import VirtioRng
from .vhost_user import Backend, DeviceClock, DeviceModel
from .virtqueue import Chain, VirtQueue

__all__ = ["Backend", "Chain", "DeviceClock", "DeviceModel", "Network", "VhostUserError",
           "VirtQueue", "VirtioDevice", "VirtioGpio", "VirtioNet", "VirtioRng"]
