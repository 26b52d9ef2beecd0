"""Pass: apply the ``output_stride`` edits to functional convolutions/poolings and add explicit padding.

Modules (``call_module`` ops) are replaced by edited copies when the extractor is built; this pass rewrites the
arguments of functional ops and inserts the asymmetric "same" padding some ops need.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from fxfeat.plan import ExtractionPlan
from fxfeat.plan.output_stride import FUNCTION_ARGS

__all__ = ["dilate"]


def _set_argument(node: fx.Node, name: str, position: int | None, value) -> None:
    if name in node.kwargs or position is None or position >= len(node.args):
        node.kwargs = {**node.kwargs, name: value}
    else:
        args = list(node.args)
        args[position] = value
        node.args = tuple(args)


def dilate(graph: fx.Graph, plan: ExtractionPlan) -> None:
    """Rewrite the ops listed in ``plan.op_edits``."""
    nodes = {node.name: node for node in graph.nodes}
    for edit in plan.op_edits:
        node = nodes[edit.node]
        if edit.target is None:
            for name, position in FUNCTION_ARGS[edit.kind].items():
                if name == "kernel_size" or (name == "padding" and edit.runtime_padding):
                    continue
                _set_argument(node, name, position, getattr(edit, name))
        if edit.explicit_pad is not None:
            with graph.inserting_before(node):
                padded = graph.call_function(F.pad, (node.args[0], edit.explicit_pad), {"value": edit.pad_value})
            node.args = (padded, *node.args[1:])
