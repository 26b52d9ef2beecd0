"""Pass: copy an output that a later in-place write would change, right after the version it stands for.

A level read before an in-place write into the same tensor (the next block's ``relu_``, a slice ``add_``) must
be returned as it was, not as it is at the end of the graph. Run after dead-code removal, so that only writes
the extractor still performs count; dead-code removal then drops writes the copy made unneeded.
"""

from __future__ import annotations

import torch.fx as fx

from fxfeat.analyse.aliases import Aliases
from fxfeat.plan import ExtractionPlan

__all__ = ["snapshot_outputs"]


def snapshot_outputs(graph: fx.Graph, plan: ExtractionPlan) -> None:
    """Read each planned output from a ``clone`` made right after its version if its tensor is written later."""
    aliases = Aliases(graph)
    nodes = {node.name: node for node in graph.nodes}
    output_node = next(node for node in reversed(graph.nodes) if node.op == "output")
    returned = output_node.args[0]
    values = list(returned.values()) if isinstance(returned, dict) else (
        list(returned) if isinstance(returned, (list, tuple)) else [returned])
    for index, output in enumerate(plan.outputs):
        value, version = nodes.get(output.node), nodes.get(output.version or output.node)
        if value is None or version is None or not aliases.written_after(value.name, version.name):
            continue
        after = max(value, version, key=lambda node: aliases.order[node.name])
        with graph.inserting_after(after):
            copy = graph.call_method("clone", (value,))
        expression = values[index]
        if expression is value:
            values[index] = copy
        else:  # the permute to NCHW made for this output
            expression.replace_input_with(value, copy)
    if isinstance(returned, dict):
        output_node.args = (dict(zip(returned, values)),)
    elif isinstance(returned, (list, tuple)):
        output_node.args = (type(returned)(values),)
    else:
        output_node.args = (values[0],)
