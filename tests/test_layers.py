"""The package's layers, bottom up: no module imports one above it, so there is no cycle,
and each layer can be used (and imported alone) without the ones above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_umtt

PACKAGE = Path(pytest_umtt.__file__).parent
LAYERS = [
    {"errors", "wire", "signature"},
    {"controller"},
    {"devices"},
    {"uml"},
    {"cache", "kconfig", "kernel", "rootfs", "ktap", "identity", "extmod", "coverage"},
    {"simulation"},
    {"canary", "kselftest", "summary", "tracetool", "divergence", "bundle", "triage"},
    {"plugin", "hookspecs"},
]
"""Each set may import its own members' siblings and every set before it."""


def layer_of(name: str) -> int:
    return next(index for index, members in enumerate(LAYERS) if name in members)


def top_level(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def package_imports(path: Path) -> set[str]:
    """The top-level package modules that ``path`` imports (relative or absolute)."""
    depth = len(path.relative_to(PACKAGE).parts) - 1
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == depth + 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found |= {name.split(".")[0] for name in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pytest_umtt."):
            found.add((node.module or "").split(".")[1])
    return found - {"__init__"}


def modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if path.name != "__init__.py" or path.parent != PACKAGE]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    own = layer_of(top_level(path))
    above = {name for name in package_imports(path) if layer_of(name) > own}
    assert not above, f"{path.relative_to(PACKAGE)} imports {above} from above its layer"


@pytest.mark.parametrize("module", ["pytest_umtt.controller", "pytest_umtt.devices",
                                    "pytest_umtt.uml.machine", "pytest_umtt.simulation"])
def test_a_layer_imports_without_the_plugin(module: str) -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; "
                               "print(sorted(m for m in sys.modules if 'plugin' in m "
                               "and m.startswith('pytest_umtt')))"],
        capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout

