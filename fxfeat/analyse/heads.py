"""Find the head of a model: the global pooling, the final linear maps and the model's own vector, i.e. where
``unpooled``, ``pooled`` and ``embedding`` features are.

- The *global pooling* is the chain node after the last feature map (or token sequence): whatever removes the
  spatial dimensions (adaptive pooling to 1x1, a mean over the spatial axes, a pooling whose kernel covers the
  map, class-token selection, a flatten). The *unpooled* node is the last map before the head, skipping
  ``nn.Identity`` calls and slices that keep the whole map. The head begins at the global pooling, or earlier:
  at the module call that pools attention-style (the innermost call holding the global pooling that receives the
  map and, before pooling, only projects it: SigLIP's attention pool, open_clip's ``attnpool``; its input is the
  unpooled map, as ``forward_features``), or at a convolutional classifier applied to the map before the global
  pooling (a 1x1 convolution, as SqueezeNet's and test-time-pooled DPN's), and then at the poolings just before
  that classifier (DPN's ``avg_pool2d(k=7, s=1)``).
- The *final linear maps*, ``pooled`` and ``embedding`` are read backwards from the returned tensor
  (:mod:`fxfeat.analyse.final_maps`): ``embedding`` is the model's own per-image vector, ``pooled`` the vector
  before its final linear maps (a classifier, a projection), or that same vector where it ends in none.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> head = analyse(trace_model(torchvision.models.resnet18().eval()), (3, 224, 224)).head
    >>> head.unpooled, head.global_pool, head.pooled, head.classifier, head.embedding
    ('layer4_1_relu_1', 'avgpool', 'flatten', 'fc', 'fc')
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from fxfeat.analyse.final_maps import FinalMaps, find_final_maps, is_vector
from fxfeat.analyse.levels import returning_calls
from fxfeat.analyse.shapes import NodeShape
from fxfeat.trace import TracedModel

__all__ = ["Head", "find_head"]


@dataclass(frozen=True)
class Head:
    """The penultimate nodes of a model (``None`` where there is none).

    Attributes:
        unpooled: the last feature map or token sequence before the global pooling.
        global_pool: the first node after it, which removes the spatial dimensions.
        classifier: the final linear map nearest the output (a classifier, or a projection where the model ends
            in one).
        pooled: the node ``mode="pooled"`` returns (the input of the final linear maps, or the last step of
            ``final.replay``), ``None`` where the model returns no tensor.
        classifier_module: path of the innermost module returning the classifier's output (``""`` if none).
        embedding: the model's own per-image vector (``mode="embedding"``/``"logits"``); ``None`` where the
            model does not return one vector per image.
        final: the returned tensor, the final linear maps and the operations replayed for ``pooled``.
        map_classifier: a 1x1 convolution applied to the last map before the global pooling (SqueezeNet's).
    """

    unpooled: str | None
    global_pool: str | None
    classifier: str | None
    pooled: str | None
    classifier_module: str = ""
    embedding: str | None = None
    final: FinalMaps = FinalMaps(output=None)
    map_classifier: str | None = None


def _module(traced: TracedModel, node: fx.Node) -> nn.Module | None:
    return traced.root.get_submodule(node.target) if node.op == "call_module" else None


def _is_parametrised(traced: TracedModel, node: fx.Node) -> bool:
    module = _module(traced, node)
    if module is not None:
        return next(module.parameters(), None) is not None
    return any(arg.op == "get_attr" for arg in node.all_input_nodes)


def _is_projection(traced: TracedModel, node: fx.Node) -> bool:
    module = _module(traced, node)
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) and module.groups == 1
    return node.op == "call_function" and node.target is F.linear


def _is_pooling(traced: TracedModel, node: fx.Node) -> bool:
    """A pooling layer or function (max, average, adaptive), which a head may apply before its classifier."""
    module = _module(traced, node)
    if module is not None:
        return isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                                   nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd))
    return node.op == "call_function" and node.target in _POOLING_FUNCTIONS


_POOLING_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
                      F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}


def _only_pools_after(traced: TracedModel, classifier: str, global_pool: str) -> bool:
    """Whether the nodes computed between a 1x1-convolution ``classifier`` and the ``global_pool`` carry no
    parameters and read nothing computed before the classifier: logits pooled (an activation, a pooling), not a
    1x1 convolution inside the features (followed by a norm, a residual sum)."""
    order = {node.name: i for i, node in enumerate(traced.graph.nodes)}
    start, end = order[classifier], order[global_pool]
    for node in traced.graph.nodes:
        if not start < order[node.name] < end or node.op in ("get_attr", "placeholder"):
            continue
        if _is_parametrised(traced, node) or any(
                order[arg.name] < start and arg.op != "get_attr" for arg in node.all_input_nodes):
            return False
    return True


def _last_projection(traced: TracedModel, chain: tuple[str, ...]) -> str | None:
    """The last parametrised operation on the chain, if it is a linear layer or a 1x1 convolution."""
    for name in reversed(chain):
        node = traced.nodes[name]
        if node.op in ("output", "placeholder") or not _is_parametrised(traced, node):
            continue
        return name if _is_projection(traced, node) else None
    return None


class _Chain:
    """The dominator chain with the node kinds the head search asks about."""

    def __init__(self, traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape]):
        self.traced, self.chain, self.shapes, self.nodes = traced, chain, shapes, traced.nodes

    def is_spatial(self, name: str) -> bool:
        return self.nodes[name].op != "output" and self.shapes.get(name) is not None and \
            self.shapes[name].fmt is not None

    def is_same_map(self, name: str) -> bool:
        """An ``nn.Identity`` call, or a slice of a map that keeps its grid and channels (``x[:, 0:]``, the prefix
        tokens dropped before a mean): the map before it."""
        node = self.nodes[name]
        if isinstance(_module(self.traced, node), nn.Identity):
            return True
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op != "call_function" or node.target is not operator.getitem or source is None:
            return False
        before, after = self.shapes.get(source.name), self.shapes[name]
        return before is not None and before.is_spatial and (before.fmt, before.reduction, before.channels) == (
            after.fmt, after.reduction, after.channels)

    def last_map_before(self, index: int) -> str | None:
        return next((self.chain[i] for i in range(index - 1, 0, -1)
                     if self.is_spatial(self.chain[i]) and not self.is_same_map(self.chain[i])), None)

    def projects_only(self, name: str) -> bool:
        """A map computed inside a pooling call by a linear layer (a per-token projection) or a function that
        moves values (reshapes, permutes, concatenation with the map's mean), not by a layer of the body."""
        node = self.nodes[name]
        module = _module(self.traced, node)
        if module is not None:
            return _is_projection(self.traced, node)
        return node.op in ("call_function", "call_method")

    def attention_pool(self, pool: int) -> int | None:
        """Where the innermost call holding the global pooling begins on the chain, if that call receives a map
        and, before pooling, only projects it (an attention pool); ``None`` otherwise."""
        calls = self.traced.node_calls.get(self.chain[pool], ())
        if not calls:
            return None
        inner = calls[-1]
        first = next(i for i, name in enumerate(self.chain) if inner in self.traced.node_calls.get(name, ()))
        if first == pool or first == 0 or not self.is_spatial(self.chain[first - 1]):
            return None
        inside = [name for name in self.chain[first:pool] if self.is_spatial(name)]
        return first if all(self.projects_only(name) for name in inside) else None


def find_head(traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape]) -> Head:
    """Locate the global pooling on the dominator chain, and the final linear maps before the returned tensor."""
    nodes, along = traced.nodes, _Chain(traced, chain, shapes)
    map_classifier = unpooled = global_pool = None
    last = max((i for i, name in enumerate(chain) if i > 0 and along.is_spatial(name)), default=None)
    if last is not None and nodes[chain[last + 1]].op != "output":
        global_pool = chain[last + 1]
        head = along.attention_pool(last + 1) or last + 1
        projection = _last_projection(traced, chain)
        if projection is not None and chain.index(projection) < head and _only_pools_after(traced, projection,
                                                                                          global_pool):
            map_classifier = projection  # a convolutional classifier before the global pool, after any
            head = chain.index(projection)
            while head > 1 and _is_pooling(traced, nodes[chain[head - 1]]):  # pooling of its own (test-time)
                head -= 1
        unpooled = along.last_map_before(head)
    final = find_final_maps(traced, shapes, chain)
    classifier = final.linear[0] if final.linear else None
    calls = [traced.calls[key].path for key in returning_calls(traced, classifier)] if classifier else []
    classifier_module = max(calls, key=lambda path: path.count("."), default="")  # the projection itself
    embedding = final.output if final.output is not None and is_vector(shapes[final.output].shape) else None
    return Head(unpooled, global_pool, classifier, final.pooled, classifier_module, embedding, final, map_classifier)
