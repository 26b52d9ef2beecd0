"""The package's shape (docs/architecture.md): each pipeline stage, and each layer that uses an extractor, imports
only the stages before it and the leaves; no module inside fxfeat imports the package face (``fxfeat/__init__``);
module-level imports have no cycles; no file of fxfeat/ is over 420 lines; and the document names the code as it
is (the files it names exist, every extraction module is in it, a file holding two passes and where each part of
the level rule lives are said)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fxfeat"
DOC = ROOT / "docs" / "architecture.md"
# The pipeline's stages in order, then the layers that use an extractor, each after what it uses: the face's
# compile and inspect (api), optimize, backbone and freeze, export, extraction, drawing (fxfeat.plot's pictures),
# zoo (fxfeat.catalog: every model's levels, compiled by api).
STAGES = ["trace", "analyse", "plan", "passes", "module", "api", "optimize", "backbone", "freeze", "export",
          "extraction", "drawing", "zoo"]
# Modules every stage may use: they import no stage.
LEAVES = ("errors", "feature_info", "runtime", "version", "models", "dual_encoders")
# The package face and the command line over it: they may import anything, and nothing else may import the face.
OUTSIDE = ("fxfeat", "fxfeat.cli", "fxfeat.__main__")
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
            for path in PACKAGE.rglob("*.py")}


def _imports(modules: dict[str, Path], everywhere: bool = False) -> nx.DiGraph:
    """Imports between fxfeat's modules (``from package import submodule`` is the submodule; ``from fxfeat import
    name`` of a name that is no submodule is the face): at module level, or ``everywhere`` (in functions too)."""
    graph = nx.DiGraph()
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree) if everywhere else tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "fxfeat":
                submodules = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = submodules if all(s in modules for s in submodules) else [node.module]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names if alias.name.split(".")[0] == "fxfeat"]
            else:
                continue
            graph.add_edges_from((name, target) for target in targets if target in modules and target != name)
    return graph


def _layer(module: str) -> str | None:
    return module.split(".")[1] if "." in module else None


def _stage(module: str) -> int | None:
    return STAGES.index(_layer(module)) if _layer(module) in STAGES else None


def test_each_stage_imports_only_earlier_stages_and_leaves():
    graph = _imports(_modules(), everywhere=True)
    later = [(a, b) for a, b in graph.edges if _stage(a) is not None and (
        _stage(b) is None and _layer(b) not in LEAVES or _stage(b) is not None and _stage(b) > _stage(a))]
    assert later == []


def test_leaves_import_no_stage():
    graph = _imports(_modules(), everywhere=True)
    assert [(a, b) for a, b in graph.edges if _layer(a) in LEAVES and _layer(b) not in LEAVES] == []


def test_no_module_inside_imports_the_package_face():
    graph = _imports(_modules(), everywhere=True)
    assert [(a, b) for a, b in graph.edges if b == "fxfeat" and a not in OUTSIDE] == []
    assert set(_modules()) - set(OUTSIDE) == {name for name in _modules() if _layer(name) in (*STAGES, *LEAVES)}


def test_module_level_imports_have_no_cycles():
    assert list(nx.simple_cycles(_imports(_modules()))) == []


def test_no_file_is_over_420_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: lines for name, lines in long.items() if lines > MAX_LINES} == {}


def test_the_document_names_files_that_exist_and_every_extraction_module():
    text = DOC.read_text()
    files = [path.relative_to(ROOT).as_posix() for folder in (PACKAGE, ROOT / "tests") for path in folder.rglob("*.py")]
    named = set(re.findall(r"`([\w/]+\.py)`", text))
    assert sorted(name for name in named if not any(f == name or f.endswith("/" + name) for f in files)) == []
    extraction = sorted(path.name for path in (PACKAGE / "extraction").glob("*.py") if path.name != "__init__.py")
    assert [name for name in extraction if f"`{name}`" not in text] == []


def test_the_document_says_which_file_holds_several_passes():
    text = DOC.read_text()
    for path in (PACKAGE / "passes").glob("*.py"):
        if path.name in ("__init__.py", "driver.py"):
            continue
        passes = [node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)
                  and not node.name.startswith("_") and node.args.args and node.args.args[0].arg == "module"]
        if len(passes) > 1:
            assert f"`{path.name}` has" in text and all(f"`{name}`" in text for name in passes), path.name


def test_the_document_says_where_each_rule_of_the_level_rule_lives():
    """Each analysis that says it holds a rule of the level rule (``rule N``) is named with that rule."""
    text = DOC.read_text()
    for path in (PACKAGE / "analyse").glob("*.py"):
        rules = set(re.findall(r"\brule (\d)\b", path.read_text()))
        if path.name == "levels.py" or not rules:  # levels.py runs them all
            continue
        where = text.find(f"`fxfeat/analyse/{path.name}`")
        span = text[where:text.find("`fxfeat/", where + 1)] if where >= 0 else ""
        assert rules <= set(re.findall(r"\brule (\d)", span)), (path.name, rules)
