"""The package's dependencies read top-down (issue 21, one-way dependencies).

Every module of ``vllm_attnmatch`` is parsed with ``ast``; each ``import`` at any depth (module level,
inside functions, under ``if TYPE_CHECKING``) counts as an edge, because a lazy import is a dependency
all the same: it only moves the failure to run time. The layers, bottom to top::

    algorithms, kernels, config, oom, contract     maths and the shared vocabulary
    ipc                                            metrics and report files (engine writes, front end reads)
    engine                                         scheduler side
    attention, worker                              worker side (worker drives attention)
    frontend                                       plugin entry point, CLI flag, support matrix, validation,
                                                   report endpoint, start-up option check

A module may import only from its own layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vllm_attnmatch

PACKAGE = "vllm_attnmatch"
ROOT = Path(vllm_attnmatch.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The package module an imported name refers to (``pkg.mod.attr`` → ``pkg.mod``), or None."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """Package-internal modules ``module`` imports, at any depth of its syntax tree."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # ``from pkg import mod`` imports the submodule ``pkg.mod``; ``from mod import name`` the module.
            names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                target = _resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {module: _imports(module, path) for module, path in MODULES.items()}
    # ``import pkg.sub.mod`` runs ``pkg/__init__`` and ``pkg/sub/__init__`` too, but those are the package's
    # own problem; an edge to a package's __init__ from its own submodules is not a circle of design.
    return graph


GRAPH = _graph()


def _subpackage(module: str) -> str:
    """``vllm_attnmatch.engine.scheduler`` → ``engine``; ``vllm_attnmatch.config`` → ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _edges_between(source: str, targets: set[str]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, imported in GRAPH.items()
        if _subpackage(module) == source
        for target in imported
        if _subpackage(target) in targets
    )


def test_the_package_is_parsed():
    # Guards the test itself: a wrong root would make every assertion below vacuous.
    assert {"vllm_attnmatch.algorithms", "vllm_attnmatch.engine.scheduler", "vllm_attnmatch.contract"} <= set(MODULES)
    assert any(GRAPH.values())


def test_no_import_cycles():
    """No module reaches itself through package-internal imports (lazy ones included)."""
    # Package __init__ modules are left out: ``from pkg.mod import x`` inside ``pkg/__init__`` is how a package
    # re-exports its members, not a circle between two designs.
    graph = {m: {t for t in targets if not MODULES[t].name == "__init__.py"} for m, targets in GRAPH.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_algorithms_import_nothing_else_of_the_package():
    """The maths is usable and testable without the engine, the workers or vLLM glue."""
    assert _edges_between("algorithms", {_subpackage(m) for m in MODULES} - {"algorithms"}) == []


def test_kernels_import_nothing_else_of_the_package():
    assert _edges_between("kernels", {_subpackage(m) for m in MODULES} - {"kernels"}) == []


def test_attention_does_not_import_the_scheduler_side():
    """The backends get their KV-cache spec from the contract, not from the scheduler's block manager."""
    assert _edges_between("attention", {"engine", "worker", "frontend"}) == []


def test_engine_imports_neither_worker_side_nor_front_end():
    assert _edges_between("engine", {"attention", "worker", "frontend"}) == []


def test_worker_does_not_import_the_scheduler_side_or_front_end():
    """What the worker needs of a job (types, geometry, class paths) is in the contract."""
    assert _edges_between("worker", {"engine", "frontend"}) == []


@pytest.mark.parametrize("layer", ["algorithms", "kernels", "contract", "ipc", "engine", "attention", "worker"])
def test_front_end_is_imported_by_no_lower_layer(layer):
    assert _edges_between(layer, {"frontend"}) == []


def test_contract_and_shared_modules_import_only_the_bottom_layer():
    """The contract is the vocabulary both sides share: it may not lean on either side."""
    upper = {"engine", "attention", "worker", "frontend", "ipc"}
    for layer in ("contract", "config", "oom"):
        assert _edges_between(layer, upper) == []


def test_ipc_sits_below_both_of_its_ends():
    """Metrics and report files are written by the engine and read by the front end: neither side's code."""
    assert _edges_between("ipc", {"engine", "attention", "worker", "frontend"}) == []


def test_every_class_path_names_a_class():
    """The strings the front end hands to vLLM import (a moved class cannot leave a stale path behind)."""
    import importlib
    import inspect

    from vllm_attnmatch.contract import class_paths

    paths = {name: value for name, value in vars(class_paths).items() if name.endswith("_CLS")}
    assert len(paths) == 6
    for name, path in paths.items():
        module, _, attr = path.replace(":", ".").rpartition(".")
        assert inspect.isclass(getattr(importlib.import_module(module), attr)), name


def test_the_vllm_entry_point_resolves_to_register():
    from importlib.metadata import entry_points

    from vllm_attnmatch.frontend.plugin import register

    (entry,) = [e for e in entry_points(group="vllm.general_plugins") if e.name == "attnmatch"]
    assert entry.load() is register


# -- the repository's other top-level packages --------------------------------------------------------------

REPO = ROOT.parent


def _top_level_imports(path: Path) -> set[str]:
    """First components of the absolute imports in one file, at any depth of its syntax tree."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
    return found


def _importers(folder: str, target: str) -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / folder).rglob("*.py") if target in _top_level_imports(p))


def test_tests_import_no_benchmark_code():
    """The server launcher both need is ``harness``; the tests of benchmark code live in ``benchmarks/tests``."""
    assert _importers("tests", "benchmarks") == []


@pytest.mark.parametrize("other", ["benchmarks", "harness", "tests"])
def test_the_plugin_imports_no_test_or_benchmark_code(other):
    assert _importers(PACKAGE, other) == []


def test_the_harness_imports_neither_tests_nor_benchmarks():
    assert _importers("harness", "benchmarks") == _importers("harness", "tests") == []
