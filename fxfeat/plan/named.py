"""Levels the user or the model names: a module path or node name given in ``levels=[...]``, and the levels a
model declares in its own timm-style ``feature_info``, placed on the traced graph."""

from __future__ import annotations

import difflib
import warnings
from typing import Any

from fxfeat.analyse import GraphAnalysis, Level
from fxfeat.errors import DeclaredLevelError, FxFeatWarning, UnknownLevelError
from fxfeat.plan.head import HEAD_FEATURES, head_level

__all__ = ["declared_levels", "named_level"]


def named_level(analysis: GraphAnalysis, name: str) -> Level:
    """The level ``name`` (a head feature: ``"unpooled"``, ``"pooled"``, ``"embedding"``, ``"logits"``; a module
    path: its last call's first output; else an fx node name) stands for.

    Raises:
        UnknownLevelError: ``name`` is none of these, with close names.
        HeadNotFoundError: the model has no such head feature.
    """
    if name in HEAD_FEATURES:
        return head_level(analysis, name)[0]
    traced = analysis.traced
    calls = traced.calls_of_module(name)
    if calls and calls[-1].outputs:
        return analysis.level_at(calls[-1].outputs[0], module=name)
    node_names = {node.name for node in traced.graph.nodes}
    if name in node_names:
        return analysis.level_at(name)
    known = sorted({call.path for call in traced.calls.values()} | node_names)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    raise UnknownLevelError(
        f"{name!r} is neither a module path nor an fx node name of {traced.model_name}."
        + (f" Close names: {', '.join(close)}." if close else ""),
        hint="run fxfeat.inspect(model) for the levels and their candidate nodes, or "
        "torchvision.models.feature_extraction.get_graph_node_names(model) for every node.",
    )


def declared_levels(analysis: GraphAnalysis) -> tuple[Level, ...]:
    """Levels named by the model's own ``feature_info``.

    A declared module that is not in the traced graph (a name the model does not have, or one inside a module
    kept opaque) is replaced by the discovered level at the declared reduction, with a warning. A module returning
    several tensors is placed on the one at the declared reduction.

    Raises:
        DeclaredLevelError: a declared level can be placed neither way.
    """
    levels, replaced = [], []
    by_reduction = {level.reduction: level for level in analysis.levels}
    for entry in analysis.declared or ():
        module, reduction = entry.get("module"), entry.get("reduction")
        calls = analysis.traced.calls_of_module(module) if isinstance(module, str) else []
        nodes = (calls[-1].inputs if entry.get("hook_type") == "forward_pre" else calls[-1].outputs) if calls else ()
        if not nodes:
            if reduction not in by_reduction:
                raise _unplaceable(analysis, entry, "it is not a module of the traced graph, and fxfeat finds no "
                                   f"level at reduction {reduction}")
            levels.append(by_reduction[reduction])
            replaced.append(f"{module!r} (by {by_reduction[reduction].module or by_reduction[reduction].node!r})")
            continue
        shapes = [analysis.shapes.get(node) for node in nodes]
        maps = [node for node, shape in zip(nodes, shapes) if shape is not None and shape.reduction == reduction]
        maps.sort(key=lambda node: analysis.shapes[node].channels != entry.get("num_chs"))  # stable: first first
        if len(nodes) > 1 and not maps:
            raise _unplaceable(analysis, entry, f"it returns {len(nodes)} tensors and none is a map at reduction "
                               f"{reduction}")
        levels.append(analysis.level_at((maps or list(nodes))[0], module=module))
    if replaced:
        warnings.warn(
            f"{analysis.traced.model_name} declares feature_info modules that are not in its traced graph; fxfeat "
            f"uses the level it finds at the declared reduction instead: {', '.join(replaced)}.",
            FxFeatWarning,
            stacklevel=5,
        )
    return tuple(levels)


def _unplaceable(analysis: GraphAnalysis, entry: dict[str, Any], why: str) -> DeclaredLevelError:
    return DeclaredLevelError(
        f"{analysis.traced.model_name} declares the level {entry.get('module')!r} (reduction "
        f"{entry.get('reduction')}) in its feature_info, but fxfeat cannot place it: {why}.",
        hint="pass levels='auto' to use the levels fxfeat finds, or name the nodes with levels=[...] "
        "(see fxfeat.inspect(model)).",
    )
