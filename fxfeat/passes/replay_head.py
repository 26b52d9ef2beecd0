"""Pass: insert the operations that compute a vector the graph does not hold (``pooled`` after two averaged heads:
the average of their inputs; a flatten after a 1x1-convolution classifier, on its input), as the plan's replay
gives them, so the outputs and a new classifier can read it by name."""

from __future__ import annotations

from typing import Any

from torch import fx

from fxfeat.analyse.final_maps import NodeRef
from fxfeat.errors import RewriteError
from fxfeat.plan import ExtractionPlan
from fxfeat.trace.metadata import output_node

__all__ = ["replay_head"]


def replay_head(module: fx.GraphModule, plan: ExtractionPlan) -> int:
    """Insert the plan's replay steps before the output, named as the plan names them; returns how many."""
    graph = module.graph
    nodes = {node.name: node for node in graph.nodes}

    def value(item: Any) -> Any:
        return nodes[item.name] if isinstance(item, NodeRef) else item

    for step in plan.replay:
        with graph.inserting_before(output_node(graph)):
            node = graph.create_node(step.op, step.target, fx.node.map_aggregate(step.args, value),
                                     fx.node.map_aggregate(step.kwargs, value), name=step.name)
        if node.name != step.name:
            raise RewriteError(f"the graph already has a node named {step.name!r}",
                               hint="this is a bug in fxfeat; please report it.")
        nodes[step.name] = node
    return len(plan.replay)
