"""The plugin's public names in one place: every fixture and marker starts with ``umtt``
(options with ``--umtt-``; ``--uml-kernel``, the name users asked for, stays beside
``--umtt-kernel``), and the older names that still work, each warning once per session
with the name to use instead."""

from __future__ import annotations

import warnings

import pytest

FIXTURE_RENAMES = {
    "uml": "umtt_machine",
    "uml_factory": "umtt_machine_factory",
    "uml_module": "umtt_module_machine",
}
"""Old fixture name -> the name to use."""

MARKER_RENAMES = {
    "uml": "umtt_machine",
    "virtual_timeout": "umtt_virtual_timeout",
    "wall_timeout": "umtt_wall_timeout",
}
"""Old marker name -> the name to use (short names other plugins may use too)."""

OPTION_ALIASES = {"--uml-kernel": ("--umtt-kernel",)}
"""Further spellings of an option's flag, equally valid (no warning)."""


class UmttDeprecationWarning(pytest.PytestDeprecationWarning):
    """An older pytest-umtt name was used; the message names the one to use."""


_WARNED = pytest.StashKey[set[str]]()


def warn_renamed(config: pytest.Config, kind: str, old: str, item: pytest.Item | None = None
                 ) -> None:
    """Say once per session that the ``kind`` ("fixture", "marker") ``old`` is now
    called by its new name; at ``item``'s location when given."""
    new = (FIXTURE_RENAMES if kind == "fixture" else MARKER_RENAMES)[old]
    warned = config.stash.setdefault(_WARNED, set())
    if f"{kind} {old}" in warned:
        return
    warned.add(f"{kind} {old}")
    message = UmttDeprecationWarning(
        f"pytest-umtt's {kind} {old!r} is deprecated: use {new!r} (it works the same)")
    if item is not None:
        item.warn(message)
    else:
        warnings.warn(message, stacklevel=3)
