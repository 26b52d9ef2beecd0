"""Inference pass: the extractor's weights in another dtype and/or channels-last memory, and its input converted
the same way at the start of the graph (:func:`~fxfeat.runtime.inputs.prepare_input`)."""

from __future__ import annotations

import torch
import torch.fx as fx

from fxfeat.runtime.inputs import prepare_input

__all__ = ["convert_layout"]


def convert_layout(module: fx.GraphModule, channels_last: bool, dtype: torch.dtype | None) -> int:
    """Convert the weights to ``dtype`` and/or channels-last, and the input at the start of the graph; returns 1
    if it converted anything."""
    if not channels_last and dtype is None:
        return 0
    if channels_last:
        module.to(memory_format=torch.channels_last)
    if dtype is not None:
        module.to(dtype)
    placeholder = next(node for node in module.graph.nodes if node.op == "placeholder")
    with module.graph.inserting_after(placeholder):
        prepared = module.graph.call_function(prepare_input, (placeholder, dtype, channels_last))
    placeholder.replace_all_uses_with(prepared, delete_user_cb=lambda user: user is not prepared)
    return 1
