"""``fxfeat.freeze``: freeze the first levels of an extractor and their normalisation layers.

Every detection recipe fine-tunes a backbone with its first stages frozen (torchvision's ``trainable_layers``,
mmdetection's ``frozen_stages``) and their batch norms kept from updating (``norm_eval``, ``FrozenBatchNorm2d``).
What a level depends on is read from the extractor's graph: the parameters of every module call and parameter read
the level's node is computed from, in the train-mode and the eval-mode graph.

Example:
    >>> import torch, torchvision, fxfeat
    >>> model = torchvision.models.resnet18()
    >>> extractor = fxfeat.compile(model, out_indices=(1, 2, 3, 4))
    >>> _ = fxfeat.freeze(extractor, up_to=1)           # the stem and layer1
    >>> extractor.get_submodule("layer1.0.conv1").weight.requires_grad, model.layer2[0].conv1.weight.requires_grad
    (False, True)
    >>> extractor.train().get_submodule("layer1.0.bn1").training     # its norms stay in eval mode
    False
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from fxfeat.backbone import Backbone
from fxfeat.errors import InvalidRequestError
from fxfeat.module import FeatureGraphModule
from fxfeat.trace.tracer import NORM_LAYERS

__all__ = ["freeze"]

_NORM_CHOICES = ("eval", "frozen", None)


def _ancestors(graph: fx.Graph, name: str) -> list[fx.Node]:
    nodes = {node.name: node for node in graph.nodes}
    if name not in nodes:
        return []
    seen, stack = {}, [nodes[name]]
    while stack:
        node = stack.pop()
        if node.name not in seen:
            seen[node.name] = node
            stack.extend(node.all_input_nodes)
    return list(seen.values())


def _convertible(module: nn.Module) -> bool:
    """A plain 2-d batch norm with running statistics, which ``FrozenBatchNorm2d`` computes the same way."""
    return (isinstance(module, nn.BatchNorm2d) and type(module).forward is nn.BatchNorm2d.forward
            and module.track_running_stats and module.running_mean is not None)


def _frozen_copy(norm: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(norm.num_features, eps=norm.eps).to(norm.running_mean.device)
    frozen.running_mean.copy_(norm.running_mean)
    frozen.running_var.copy_(norm.running_var)
    if norm.affine:
        frozen.weight.copy_(norm.weight.detach())
        frozen.bias.copy_(norm.bias.detach())
    return frozen


def freeze(extractor: FeatureGraphModule, up_to: int, norm: str | None = "eval") -> FeatureGraphModule:
    """Freeze the parameters levels ``0..up_to`` depend on; keep their normalisation layers from training.

    Args:
        extractor: an extractor made by :func:`fxfeat.compile` (or the ``body`` of :func:`fxfeat.backbone`).
        up_to: index of the last frozen level in ``extractor.feature_info`` (all levels, returned or not); ``-1``
            freezes nothing.
        norm: what happens to the batch and instance norms those levels depend on: ``"eval"`` keeps them in eval
            mode across later ``.train()`` calls (their statistics stop updating, as mmdetection's
            ``norm_eval``); ``"frozen"`` also replaces each plain ``BatchNorm2d`` the graph calls by a
            ``torchvision.ops.FrozenBatchNorm2d`` copy (others are kept in eval mode); ``None`` leaves them to
            ``.train()``.

    The parameters are the model's own objects, so the model's ``requires_grad`` flags change too (as with
    torchvision's ``trainable_layers``); ``"frozen"`` copies exist only in the extractor. Returns ``extractor``.

    Raises:
        InvalidRequestError: ``up_to`` is not a level index, ``norm`` is not one of the choices, or the level is
            not computed by the extractor.
    """
    if isinstance(extractor, Backbone):
        extractor = extractor.body
    if not isinstance(extractor, FeatureGraphModule):
        raise InvalidRequestError(
            f"fxfeat.freeze takes an extractor made by fxfeat.compile or fxfeat.backbone; got "
            f"{type(extractor).__name__}.",
            hint="extractor = fxfeat.compile(model); fxfeat.freeze(extractor, up_to=1).")
    if norm not in _NORM_CHOICES:
        raise InvalidRequestError(f"norm must be one of {_NORM_CHOICES}; got {norm!r}.", hint='norm="eval".')
    count = len(extractor.feature_info)
    if not isinstance(up_to, int) or not -1 <= up_to < count:
        raise InvalidRequestError(
            f"up_to={up_to!r} is not a level index: the extractor has {count} levels (0 to {count - 1}).",
            hint="up_to=-1 freezes nothing; up_to=i freezes levels 0 to i.")
    if up_to == -1:
        return extractor
    level = extractor.feature_info[up_to]
    ancestors = [node for graph in extractor.mode_graphs.values() for node in _ancestors(graph, level["node"])]
    if not ancestors:
        raise InvalidRequestError(
            f"level {up_to} ({level['module'] or level['node']}) is not computed by this extractor, which stops "
            f"at level {max(extractor.feature_info.out_indices)}.",
            hint="freeze a level the extractor computes, or compile with out_indices up to that level.")
    calls = {node.target for node in ancestors if node.op == "call_module"}
    reads = {node.target for node in ancestors if node.op == "get_attr"}
    for target in sorted(calls):
        extractor.get_submodule(target).requires_grad_(False)
    for target in reads:
        owner, _, name = target.rpartition(".")
        parameter = extractor.get_submodule(owner)._parameters.get(name)
        if parameter is not None:
            parameter.requires_grad_(False)
    if norm is not None:
        _freeze_norms(extractor, sorted(calls), convert=norm == "frozen")
    return extractor


def _freeze_norms(extractor: FeatureGraphModule, calls: list[str], convert: bool) -> None:
    kept = set(extractor.eval_mode_norms)
    for target in calls:
        module = extractor.get_submodule(target)
        if convert and _convertible(module):
            owner, _, name = target.rpartition(".")
            setattr(extractor.get_submodule(owner), name, _frozen_copy(module))
            continue
        for path, inner in module.named_modules(prefix=target):
            if isinstance(inner, NORM_LAYERS):
                kept.add(path)
                inner.eval()
    extractor.eval_mode_norms = kept
