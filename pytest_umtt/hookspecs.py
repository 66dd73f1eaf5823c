"""Hooks a conftest.py (or plugin) can implement to shape pytest-umtt's machines."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .uml.machine import Machine

hookspec = pluggy.HookspecMarker("pytest")


@hookspec
def pytest_umtt_kernel_cmdline(name: str) -> list[str] | None:
    """Extra kernel command-line arguments for the machine called ``name``.

    Every implementation's list is appended, in hook order.
    """


@hookspec
def pytest_umtt_doorbell(machine: Machine, value: int) -> None:
    """A guest rang the doorbell (wrote ``value`` to /sys/kernel/um-ext-time/bc-message).

    Called at the virtual instant of the ring, with the simulation paused.
    """
