"""The package's shape (docs/architecture.md): each pipeline stage imports only the stages before it, module-level
imports have no cycles, and no file of fxfeat/ is over 420 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "fxfeat"
# The pipeline's stages in order; runtime/, errors and feature_info are leaves every stage may use, and the modules
# that use an extractor (export, optimize, freeze, backbone, extraction, api, cli) come after all of them.
STAGES = ["trace", "analyse", "plan", "passes", "module"]
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _imports(modules: dict[str, Path]) -> nx.DiGraph:
    """Module-level imports between fxfeat's modules (``from package import submodule`` is the submodule)."""
    graph = nx.DiGraph()
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxfeat"):
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = submodules if all(s in modules for s in submodules) else [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.startswith("fxfeat")]
            else:
                continue
            graph.add_edges_from((name, target) for target in targets if target in modules and target != name)
    return graph


def _stage(module: str) -> int | None:
    part = module.split(".")[1] if "." in module else None
    return STAGES.index(part) if part in STAGES else None


def test_each_stage_imports_only_earlier_stages():
    graph = _imports(_modules())
    later = [(a, b) for a, b in graph.edges if _stage(a) is not None and (_stage(b) is None and b.split(".")[1] not in (
        "errors", "feature_info", "runtime") or _stage(b) is not None and _stage(b) > _stage(a))]
    assert later == []


def test_module_level_imports_have_no_cycles():
    assert list(nx.simple_cycles(_imports(_modules()))) == []


def test_no_file_is_over_420_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}
