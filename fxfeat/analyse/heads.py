"""Find the global pooling and the classifier of a model: where ``unpooled`` and ``pooled`` features are.

- The *global pooling* is the chain node after the last feature map (or token sequence): whatever removes the
  spatial dimensions (adaptive pooling to 1x1, a mean over the spatial axes, a pooling whose kernel covers the
  map, class-token selection, a flatten). The *unpooled* node is the last map before the head, skipping
  ``nn.Identity`` calls; the head begins at the global pooling, or at a convolutional classifier applied before
  it (a 1x1 convolution on the map, as SqueezeNet's and test-time-pooled DPN's), and then at the poolings just
  before that classifier (DPN's ``avg_pool2d(k=7, s=1)``).
- The *classifier* is the last parametrised operation on the chain, if it is a projection (``nn.Linear``,
  ``F.linear``, or a 1x1 convolution); the *pooled* node is its input. Layers between the pooling and the
  classifier (a ``conv_head`` after pooling, a pre-logits block, a norm) stay in, as in timm's ``num_classes=0``:
  the pooled features are exactly what the final projection sees.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> head = analyse(trace_model(torchvision.models.resnet18().eval()), (3, 224, 224)).head
    >>> head.unpooled, head.global_pool, head.pooled, head.classifier
    ('layer4_1_relu_1', 'avgpool', 'flatten', 'fc')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

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
        classifier: the final projection producing the logits.
        pooled: the classifier's input.
        classifier_module: path of the innermost module returning the classifier's output, whose input the
            pooled features are (``""`` if none).
    """

    unpooled: str | None
    global_pool: str | None
    classifier: str | None
    pooled: str | None
    classifier_module: str = ""


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


def find_head(traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape]) -> Head:
    """Locate the global pooling and the classifier on the dominator chain."""
    nodes = traced.nodes

    def is_spatial(name: str) -> bool:
        return nodes[name].op != "output" and shapes.get(name) is not None and shapes[name].fmt is not None

    def is_identity(name: str) -> bool:
        return isinstance(_module(traced, nodes[name]), nn.Identity)

    classifier = pooled = None
    for name in reversed(chain):
        node = nodes[name]
        if node.op in ("output", "placeholder") or not _is_parametrised(traced, node):
            continue
        if _is_projection(traced, node):
            inputs = [arg for arg in node.all_input_nodes if arg.op != "get_attr"]
            if inputs:
                classifier, pooled = name, inputs[0].name
        break

    unpooled = global_pool = None
    last = max((i for i, name in enumerate(chain) if i > 0 and is_spatial(name)), default=None)
    if last is not None and nodes[chain[last + 1]].op != "output":
        global_pool = chain[last + 1]
        head = last + 1
        if classifier is not None and chain.index(classifier) < head and _only_pools_after(traced, classifier,
                                                                                          global_pool):
            head = chain.index(classifier)  # a convolutional classifier before the global pool, after any
            while head > 1 and _is_pooling(traced, nodes[chain[head - 1]]):  # pooling of its own (test-time)
                head -= 1
        unpooled = next(
            (chain[i] for i in range(head - 1, 0, -1) if is_spatial(chain[i]) and not is_identity(chain[i])), None
        )
    calls = [traced.calls[key].path for key in returning_calls(traced, classifier)] if classifier else []
    classifier_module = max(calls, key=lambda path: path.count("."), default="")  # the projection itself
    return Head(unpooled, global_pool, classifier, pooled, classifier_module)
