"""Inference pass: fold each batch norm into the convolution or linear layer that feeds it.

In eval mode ``bn(conv(x))`` is ``conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` and
``b' = (b - m) * g / sqrt(v + eps) + beta``: one op instead of two. A norm is a plain ``nn.BatchNorm1d/2d/3d``
call in eval mode, or a ``F.batch_norm(..., training=False)`` call on tensors held by the module (what
:func:`~fxfeat.passes.inline_norms.inline_norm_layers` leaves of a library's norm class). It is folded when its
input is a ``call_module`` convolution (or linear layer) that nothing else reads, and the layer is the plain
torch class (a subclass may compute something else), called once. The folded layer is a new module with new
parameters; the graph module given is changed and is for inference only (the passes run on a copy: the model
and the extractor stay as they are).

Example:
    >>> import torch, torchvision, fxfeat
    >>> from fxfeat.optimize import inference_copy
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1,)).eval()
    >>> folded = inference_copy(extractor)
    >>> from fxfeat.passes.driver import run_passes
    >>> run_passes(folded, [fold_batch_norms])     # the stem's and four in layer1
    {'fold_batch_norms': 5}
    >>> x = torch.randn(1, 3, 64, 64)
    >>> torch.allclose(folded(x)[0], extractor(x)[0], rtol=1e-4, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from operator import attrgetter
from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fxfeat.passes.graph_edits import call_counts, value_readers

__all__ = ["fold_batch_norms"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # SyncBatchNorm: a batch norm in eval
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Statistics(NamedTuple):
    """What a batch norm in eval mode computes with."""

    mean: torch.Tensor
    var: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _tensor(module: fx.GraphModule, value) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node names (``None`` for ``None``); raises ``LookupError`` for anything else."""
    if value is None:
        return None
    if isinstance(value, fx.Node) and value.op == "get_attr":
        tensor = attrgetter(value.target)(module)
        if isinstance(tensor, torch.Tensor):
            return tensor
    raise LookupError(value)


def _statistics(module: fx.GraphModule, node: fx.Node) -> _Statistics | None:
    """The statistics of ``node`` if it is a batch norm in eval mode with running statistics, else ``None``."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        norm = module.get_submodule(node.target)
        if type(norm) not in _NORMS or norm.training or norm.running_mean is None:
            return None
        return _Statistics(norm.running_mean, norm.running_var, norm.weight, norm.bias, norm.eps)
    if node.op != "call_function" or node.target is not F.batch_norm:
        return None
    arguments = node.normalized_arguments(module, normalize_to_only_use_kwargs=True)
    if arguments is None:
        return None
    kwargs = arguments.kwargs
    if kwargs.get("training") is not False or not isinstance(kwargs.get("eps"), float):
        return None
    try:
        statistics = _Statistics(*(_tensor(module, kwargs.get(key)) for key in
                                   ("running_mean", "running_var", "weight", "bias")), kwargs["eps"])
    except LookupError:
        return None
    return statistics if statistics.mean is not None and statistics.var is not None else None


def _folded(layer: nn.Module, statistics: _Statistics) -> nn.Module | None:
    """A copy of ``layer`` computing ``norm(layer(x))``, or ``None`` when the shapes do not fit."""
    mean, var, weight, bias, eps = statistics
    channels = mean.numel()
    weight = weight if weight is not None else torch.ones_like(mean)
    bias = bias if bias is not None else torch.zeros_like(mean)
    if type(layer) in _CONVOLUTIONS and not layer.transposed and layer.out_channels == channels:
        fused = copy.deepcopy(layer)
        fused.weight, fused.bias = fuse_conv_bn_weights(layer.weight, layer.bias, mean, var, eps, weight, bias)
        return fused
    if type(layer) is nn.Linear and layer.out_features == channels:
        fused = copy.deepcopy(layer)
        fused.weight, fused.bias = fuse_linear_bn_weights(layer.weight, layer.bias, mean, var, eps, weight, bias)
        return fused
    return None


def fold_batch_norms(module: fx.GraphModule) -> int:
    """Fold every foldable batch norm of ``module``'s graph into its layer; returns how many were folded."""
    calls = call_counts(module.graph)
    folded = 0
    for node in list(module.graph.nodes):
        statistics = _statistics(module, node)
        source = node.args[0] if statistics is not None else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or value_readers(source) != [node]:
            continue
        if calls[source.target] != 1:  # a layer called twice keeps its weights
            continue
        layer = module.get_submodule(source.target)
        if layer.training or (isinstance(layer, nn.Linear) and _channels_dim_mismatch(node, module)):
            continue
        fused = _folded(layer, statistics)
        if fused is None:
            continue
        module.set_submodule(source.target, fused)
        node.replace_all_uses_with(source)
        module.graph.erase_node(node)
        folded += 1
    if folded:  # the functional norms' statistics, read by nothing now
        for node in list(module.graph.nodes):
            if node.op == "get_attr" and not node.users:
                module.graph.erase_node(node)
    return folded


def _channels_dim_mismatch(norm: fx.Node, module: fx.GraphModule) -> bool:
    """A batch norm normalises dimension 1; a linear layer writes the last one. They agree only on ``(N, C)``
    inputs, which a ``BatchNorm1d`` module cannot tell from ``(N, C, L)``; the shapes ``ShapeProp`` recorded
    can (no recorded shape: not folded)."""
    meta = norm.meta.get("tensor_meta")
    return getattr(meta, "shape", None) is None or len(meta.shape) != 2
