"""Inference pass: remove the nodes that return their input unchanged in eval mode.

``nn.Identity``, the dropout modules of ``torch.nn`` (eval mode) and the functional dropouts called with
``training=False`` return their input tensor itself, so each is removed and its readers read its input: the same
tensor, with no call. Only the plain torch classes count (a subclass may compute something).

Example:
    >>> import timm, fxfeat
    >>> from fxfeat.optimize import inference_copy
    >>> module = inference_copy(fxfeat.compile(timm.create_model("vit_tiny_patch16_224"), mode="pooled"))
    >>> remove_no_ops(module)    # per block: q/k norms, dropouts, layer scales, drop paths (nn.Identity)
    138
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["remove_no_ops"]

_NO_OP_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout)
_DROPOUT_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


def _returns_its_input(module: fx.GraphModule, node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        layer = module.get_submodule(node.target)
        return type(layer) in _NO_OP_MODULES and (isinstance(layer, nn.Identity) or not layer.training) \
            and len(node.args) == 1 and not node.kwargs
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        arguments = node.normalized_arguments(module, normalize_to_only_use_kwargs=True)
        return arguments is not None and arguments.kwargs.get("training") is False \
            and not arguments.kwargs.get("inplace")
    return False


def remove_no_ops(module: fx.GraphModule) -> int:
    """Remove every no-op node of ``module``'s graph (changed in place); returns how many were removed."""
    removed = 0
    for node in list(module.graph.nodes):
        if _returns_its_input(module, node):
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
            removed += 1
    return removed
