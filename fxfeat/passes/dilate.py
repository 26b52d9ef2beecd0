"""Pass: apply the ``output_stride`` edits: a module called (``call_module``) is replaced in the GraphModule by an
edited copy, a functional convolution or pooling gets the edited arguments, and the asymmetric "same" padding
some ops need is inserted before them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import fx

from fxfeat.errors import RewriteError
from fxfeat.plan import ExtractionPlan
from fxfeat.plan.output_stride import FUNCTION_ARGS, edited_module

__all__ = ["dilate"]


def _set_argument(node: fx.Node, name: str, position: int | None, value) -> None:
    if name in node.kwargs or position is None or position >= len(node.args):
        node.kwargs = {**node.kwargs, name: value}
    else:
        args = list(node.args)
        args[position] = value
        node.args = tuple(args)


def dilate(module: fx.GraphModule, plan: ExtractionPlan) -> int:
    """Rewrite the ops listed in ``plan.op_edits``: a function's arguments, or the module called, replaced in
    ``module`` by an edited copy (the model's own layer is untouched). Returns how many ops were edited."""
    graph = module.graph
    nodes = {node.name: node for node in graph.nodes}
    targets = {node.target for node in graph.nodes if node.op in ("call_module", "get_attr")}
    for edit in plan.op_edits:
        node = nodes[edit.node]
        if edit.target is not None:
            parts = edit.target.split(".")
            shared = [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in targets]
            if shared:  # the module holding the layer is the model's own object: replacing in it would change it
                raise RewriteError(f"{edit.target} lies inside {shared[0]}, which the graph also calls",
                                   hint="this is a bug in fxfeat; please report it with the model.")
            module.add_submodule(edit.target, edited_module(module.get_submodule(edit.target), edit))
        else:
            for name, position in FUNCTION_ARGS[edit.kind].items():
                if name == "kernel_size" or (name == "padding" and edit.runtime_padding):
                    continue
                _set_argument(node, name, position, getattr(edit, name))
        if edit.explicit_pad is not None:
            with graph.inserting_before(node):
                padded = graph.call_function(F.pad, (node.args[0], edit.explicit_pad), {"value": edit.pad_value})
            node.args = (padded, *node.args[1:])
    return len(plan.op_edits)
