"""Inference pass: fold each batch norm into the convolution or linear layer that feeds it.

In eval mode ``bn(conv(x))`` is ``conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``: one op instead of two. A norm is folded when its only input is a
``call_module`` convolution (or linear layer) that nothing else reads, and both modules are the plain torch
classes (a subclass may compute something else), each called once. The folded layer is a new module with new
parameters; the graph module given is changed and is for inference only (work on a copy: the model and the
extractor must stay as they are). Part of issue 13's ``optimize_for_inference``, not wired in yet.

Example:
    >>> import copy, torch, torchvision, fxfeat
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1,)).eval()
    >>> folded = copy.deepcopy(extractor)
    >>> fold_batch_norms(folded)     # the stem's and four in layer1
    5
    >>> x = torch.randn(1, 3, 64, 64)
    >>> torch.allclose(folded(x)[0], extractor(x)[0], rtol=1e-4, atol=1e-5)
    True
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

__all__ = ["fold_batch_norms"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FUSERS = {nn.Conv1d: fuse_conv_bn_eval, nn.Conv2d: fuse_conv_bn_eval, nn.Conv3d: fuse_conv_bn_eval,
           nn.Linear: fuse_linear_bn_eval}


def _plain(module: nn.Module, classes) -> bool:
    return type(module) in classes


def _foldable(layer: nn.Module, norm: nn.Module) -> bool:
    if not (_plain(layer, _FUSERS) and _plain(norm, _NORMS)) or norm.running_mean is None:
        return False
    if isinstance(layer, nn.Linear):
        return norm.num_features == layer.out_features and isinstance(norm, nn.BatchNorm1d)
    return norm.num_features == layer.out_channels and not getattr(layer, "transposed", False)


def fold_batch_norms(module: fx.GraphModule) -> int:
    """Fold every foldable batch norm of ``module``'s graph into its layer; returns how many were folded."""
    calls: dict[str, int] = {}
    for node in module.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if calls[source.target] != 1 or calls[node.target] != 1:  # a layer called twice keeps its weights
            continue
        norm, layer = module.get_submodule(node.target), module.get_submodule(source.target)
        if not _foldable(layer, norm):
            continue
        fused = _FUSERS[type(layer)](layer.eval(), norm.eval())
        owner, _, name = source.target.rpartition(".")
        setattr(module.get_submodule(owner), name, fused)
        node.replace_all_uses_with(source)
        module.graph.erase_node(node)
        folded += 1
    if folded:
        module.graph.lint()
        module.recompile()
    return folded
