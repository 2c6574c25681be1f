"""The layout is the architecture (docs/architecture.md): the pure core imports no edge, no I/O and no
clock; no two modules import each other; every error fleetserve raises derives from FleetserveError.

Imports are read from the source (module level and inside functions, since a lazy import is still a
dependency when it runs); imports under `if TYPE_CHECKING:` are type annotations only and not counted.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Iterable
from pathlib import Path

import pytest

import fleetserve
from fleetserve.errors import FleetserveError

PACKAGE_DIR = Path(fleetserve.__file__).parent
# the rooms both clocks run: decisions, the engine model, the request path, the fleet-shape interface
PURE_CORE = (
    "model", "routing", "pipeline", "tenants", "migration", "autoscale", "control", "errors", "named",
)  # fmt: skip
# the rooms with I/O or a clock of their own, and the configuration (the core takes plain values)
NOT_FOR_THE_CORE = ("gateway", "sim", "fleet", "engines", "cli", "bench", "config")
# I/O, concurrency and the wall clock: time reaches the core as `now`, from whichever clock runs it
FORBIDDEN_IN_CORE = ("asyncio", "aiohttp", "httpx", "socket", "subprocess", "threading", "time", "datetime",
                     "uvicorn", "starlette", "zmq")  # fmt: skip


def module_files(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join((package, *parts)).removesuffix(".__init__")
        out[name] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Every module `name` imports at run time (absolute names; `from a import b` counts a.b when that
    is a module)."""
    known = set(known)
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(
                f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known
            )
    return found


def _owner(module: str, known: set[str]) -> str | None:
    while module and module not in known:
        module = module.rpartition(".")[0]
    return module or None


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    files = module_files(root, package)
    known = set(files)
    graph = {}
    for name, path in files.items():
        owners = {_owner(m, known) for m in imports_of(name, path, known) if m.startswith(package)}
        graph[name] = {owner for owner in owners if owner is not None and owner != name}
    return graph


def mutual_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, deps in graph.items() for b in deps if a < b and a in graph.get(b, ()))


def core_violations(root: Path, package: str) -> list[str]:
    files = module_files(root, package)
    core = tuple(f"{package}.{room}" for room in PURE_CORE)
    banned = tuple(f"{package}.{room}" for room in NOT_FOR_THE_CORE)
    problems = []
    for name, path in sorted(files.items()):
        if not any(name == room or name.startswith(room + ".") for room in core):
            continue
        for module in sorted(imports_of(name, path, files)):
            edge = any(module == room or module.startswith(room + ".") for room in banned)
            if module.split(".")[0] in FORBIDDEN_IN_CORE or edge:
                problems.append(f"{name} imports {module}")
    return problems


def test_the_pure_core_imports_no_edge_no_io_and_no_clock() -> None:
    assert core_violations(PACKAGE_DIR, "fleetserve") == []


def test_no_two_modules_import_each_other() -> None:
    assert mutual_imports(import_graph(PACKAGE_DIR, "fleetserve")) == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The checks above can fail: a planted core module that reads the clock and two modules that import
    each other are both found."""
    root = tmp_path / "pkg"
    (root / "routing").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "routing" / "__init__.py").write_text("")
    (root / "routing" / "bad.py").write_text("def f():\n    import time\n    from pkg import a, sim\n")
    (root / "sim.py").write_text("")
    (root / "a.py").write_text("from pkg.routing import bad\n")
    (root / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n")
    graph = import_graph(root, "pkg")
    assert mutual_imports(graph) == [("pkg.a", "pkg.routing.bad")]
    assert graph["pkg.typed"] == set()  # type-only imports do not count
    assert core_violations(root, "pkg") == ["pkg.routing.bad imports pkg.sim", "pkg.routing.bad imports time"]


def _all_modules() -> list[str]:
    return [info.name for info in pkgutil.walk_packages(fleetserve.__path__, "fleetserve.")]


@pytest.mark.parametrize("module_name", _all_modules())
def test_every_exception_of_the_package_derives_from_fleetserve_error(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name, value in vars(module).items():
        if inspect.isclass(value) and value.__module__ == module_name and issubclass(value, BaseException):
            assert issubclass(value, FleetserveError), (
                f"{module_name}.{name} does not derive from FleetserveError"
            )
