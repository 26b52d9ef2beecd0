"""Pass: delete every node the outputs do not need.

Unlike ``fx.Graph.eliminate_dead_code``, side-effect-only checks (``torch._assert`` on a later stage's shape)
do not keep a pruned stage alive; in-place ops on tensors that are still needed are kept.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from fxfeat.plan import ExtractionPlan

__all__ = ["remove_dead_code"]

_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates_first_argument(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_")) or bool(
            node.kwargs.get("inplace")
        )
    return False


def remove_dead_code(graph: fx.Graph, plan: ExtractionPlan | None = None) -> None:
    """Erase every node that neither feeds the output nor mutates a tensor that does."""
    live: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        first = node.args[0] if node.args else None
        keep = node.op in ("output", "placeholder") or node in live
        keep = keep or (_mutates_first_argument(node) and isinstance(first, fx.Node) and first in live)
        if keep:
            live.add(node)
            live.update(node.all_input_nodes)
    for node in reversed(list(graph.nodes)):
        if node not in live:
            graph.erase_node(node)
