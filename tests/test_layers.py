"""The package's layers, bottom up: no module imports one above it, so there is no cycle,
and each layer can be used (and imported alone) without the ones above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_umtt
from pytest_umtt import simulation
from pytest_umtt.uml import machine

PACKAGE = Path(pytest_umtt.__file__).parent
LAYERS = [
    {"units", "errors", "wire", "signature", "placement"},
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



def test_the_trace_tool_loads_no_machines() -> None:
    """``umtt-trace`` reads traces: it needs neither pexpect, psutil, the machines nor the
    guest root, which the package's exports would otherwise bring along."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pytest_umtt.tracetool; "
                               "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                               "('pexpect', 'psutil') or m.startswith('pytest_umtt.')))"],
        capture_output=True, text=True, check=True)
    assert loaded.stdout.split() == [
        "['pytest_umtt.divergence',", "'pytest_umtt.errors',", "'pytest_umtt.tracetool',",
        "'pytest_umtt.units']"], loaded.stdout


def test_the_package_exports_load_on_first_use() -> None:
    assert pytest_umtt.Simulation is simulation.Simulation
    assert pytest_umtt.Machine is machine.Machine
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        pytest_umtt.Nothing  # noqa: B018


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every package module ``path`` imports, type-only imports (under TYPE_CHECKING)
    included: a cycle through them is a cycle in the design all the same."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = ".".join(package[:len(package) - node.level + 1])
            module = f"{base}.{node.module}" if node.module else base
        else:
            module = node.module or ""
        if not module.startswith("pytest_umtt"):
            continue
        names = [f"{module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name in ALL_MODULES} or {module}
    return found - {module_name(path)}


ALL_MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def test_no_two_modules_import_each_other_even_for_types_only() -> None:
    graph = {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}
    cycles = []
    for start in sorted(graph):
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, "\n".join(cycles)
