"""Pass: make the graph return the planned nodes (a list, a dict or one tensor), as ``NCHW`` maps if asked.

Token sequences become maps with sizes read at run time (the batch and channel counts from the tokens, the grid
from the map the tokens were flattened from), so the extractor follows the input size and exports with dynamic
sizes.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from fxfeat.analyse.shapes import TokenGrid
from fxfeat.plan import ExtractionPlan
from fxfeat.trace.metadata import output_node

__all__ = ["expose_outputs"]


def expose_outputs(module: fx.GraphModule, plan: ExtractionPlan) -> int:
    """Replace the graph's output by the plan's outputs; returns how many."""
    graph = module.graph
    nodes = {node.name: node for node in graph.nodes}
    returning = output_node(graph)
    values = []
    for output in plan.outputs:
        value = nodes[output.node]
        with graph.inserting_before(returning):
            if output.permute:
                value = graph.call_method("permute", (value, *output.permute))
            elif output.tokens is not None:
                value = _tokens_to_map(graph, value, *output.tokens, nodes, returning)
        values.append(value)
    if plan.return_dict:
        result = {output.name: value for output, value in zip(plan.outputs, values)}
    else:
        result = values[0] if plan.single else values
    returning.args = (result,)
    returning.type = None  # the model's return annotation no longer describes what is returned
    return len(plan.outputs)


def _grid_size(graph: fx.Graph, grid: TokenGrid, nodes: dict[str, fx.Node]) -> tuple[fx.Node, fx.Node]:
    """Nodes reading the grid's height and width at run time from the map the tokens were flattened from, right
    after it (so that the map is not kept alive for them)."""
    source = nodes[grid.source]
    with graph.inserting_after(source):
        height = graph.call_method("size", (source, grid.source_dims[0]))
    with graph.inserting_after(height):
        width = graph.call_method("size", (source, grid.source_dims[1]))
    return height, width


def _tokens_to_map(graph, tokens: fx.Node, fmt: str, grid: TokenGrid, nodes, returning) -> fx.Node:
    """``NCHW`` map of a token sequence: prefix tokens dropped, the rest reshaped to the grid."""
    height, width = _grid_size(graph, grid, nodes)
    with graph.inserting_before(returning):
        batch = graph.call_method("size", (tokens, 0))
        token_dim = 1 if fmt == "NLC" else 2
        channels = graph.call_method("size", (tokens, 3 - token_dim))
        if grid.prefix:
            index = (slice(None), slice(grid.prefix, None)) if fmt == "NLC" else (slice(None), slice(None),
                                                                                  slice(grid.prefix, None))
            tokens = graph.call_function(operator.getitem, (tokens, index))
        if fmt == "NCL":
            return graph.call_method("reshape", (tokens, batch, channels, height, width))
        grid_map = graph.call_method("reshape", (tokens, batch, height, width, channels))
        return graph.call_method("permute", (grid_map, 0, 3, 1, 2))
