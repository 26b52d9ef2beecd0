"""Pass: make the graph return the planned nodes (a list, a dict or one tensor), permuted as requested."""

from __future__ import annotations

import torch.fx as fx

from fxfeat.plan import ExtractionPlan

__all__ = ["expose_outputs"]


def expose_outputs(graph: fx.Graph, plan: ExtractionPlan) -> None:
    """Replace the graph's output by the plan's outputs."""
    nodes = {node.name: node for node in graph.nodes}
    output_node = next(node for node in reversed(graph.nodes) if node.op == "output")
    values = []
    with graph.inserting_before(output_node):
        for output in plan.outputs:
            value = nodes[output.node]
            if output.permute:
                value = graph.call_method("permute", (value, *output.permute))
            values.append(value)
    if plan.return_dict:
        result = {output.name: value for output, value in zip(plan.outputs, values)}
    else:
        result = values[0] if plan.single else values
    output_node.args = (result,)
    output_node.type = None  # the model's return annotation no longer describes what is returned
