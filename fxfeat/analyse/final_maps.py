"""The model's own final vector and the final linear maps that produce it: where ``embedding`` and ``pooled`` are.

The graph is read backwards from the tensor the model returns (for a structured output, its ``image_embeds``
field where it has one, else ``pooler_output``, else the returned tensor computed furthest from the input):

- A *final linear map* is a linear map (``nn.Linear``, a 1x1 convolution, ``F.linear`` or a matrix product with a
  parameter, as open_clip's ``x @ self.proj``) whose output reaches the returned tensor through *transparent*
  operations only: operations that select, move or average values and keep the map's output features (flatten,
  squeeze, indexing, reshapes, ``nn.Identity``, dropout, average pooling, means), other final linear maps (a
  projection then a classifier), and sums and scalings of several such branches (two heads averaged).
- ``embedding`` is the returned tensor itself: the model's own per-image vector (logits, a projected embedding, or
  a headless model's pooled features).
- ``pooled`` is the returned tensor recomputed with every final linear map replaced by its input: the input of
  the first map of a final chain (a classifier's or a projection's input), the same average of their inputs for
  two heads on two tokens (a distilled DeiT), their shared input for two heads on one (LeViT), the average
  pooling or flatten after a 1x1-convolution classifier replayed on its input. A batch norm feeding a final map
  and nothing else (with dropout between: a ``NormLinear`` head) is an affine map per channel, part of the final
  map: ``pooled`` is the norm's input, as timm's ``pre_logits``. Where the model ends in no final
  linear map (a headless model, an attention pool, a linear map followed by an activation or a norm), ``pooled``
  is the returned tensor: those layers are part of the pooling.

The operations after the first final linear map that must run again on its input are the *replay*: a short,
printable recipe the rewrite inserts into the extractor.

Example:
    >>> import torch, torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> final = analyse(trace_model(torchvision.models.resnet18().eval()), (3, 224, 224)).head.final
    >>> final.output, final.linear, final.pooled, final.replay
    ('fc', ('fc',), 'flatten', ())
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxfeat.analyse.shapes import NodeShape
from fxfeat.trace import TracedModel
from fxfeat.trace.metadata import data_inputs, output_node
from fxfeat.trace.probe import PROBE_BATCH

__all__ = ["FinalMaps", "NodeRef", "ReplayStep", "find_final_maps", "is_vector", "returned_tensor"]

OUTPUT_FIELDS = ("image_embeds", "pooler_output")  # a structured output's per-image vector, by preference


@dataclass(frozen=True)
class NodeRef:
    """An argument of a replayed step naming a node of the graph (or an earlier step, by its name)."""

    name: str


@dataclass(frozen=True)
class ReplayStep:
    """One operation after the final linear maps, run again on their inputs. Node arguments are :class:`NodeRef`."""

    name: str
    op: str
    target: Any
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def references(self) -> list[NodeRef]:
        """The nodes (or earlier steps) this step reads."""
        return _refs((self.args, self.kwargs))

    def __str__(self) -> str:
        target = self.target if isinstance(self.target, str) else getattr(self.target, "__name__", self.target)
        return f"{self.name} = {target}{tuple(_describe(arg) for arg in self.args)}"


@dataclass(frozen=True)
class FinalMaps:
    """The returned vector and the final linear maps before it.

    Attributes:
        output: node of the tensor the model returns (``nn.Identity`` calls skipped); ``None`` for no tensor.
        linear: the final linear maps, from the output backwards.
        pooled: the node ``pooled`` reads: the input of the final linear maps, or the replay's last step.
        replay: the operations after the final linear maps recomputed on their inputs (empty: ``pooled`` is a
            node of the graph).
        shape: per-sample shape of ``pooled`` at the probe size.
    """

    output: str | None
    linear: tuple[str, ...] = ()
    pooled: str | None = None
    replay: tuple[ReplayStep, ...] = ()
    shape: tuple[int, ...] = ()


def _describe(arg: Any) -> str:
    return arg.name if isinstance(arg, NodeRef) else repr(arg)


def _refs(value: Any) -> list[NodeRef]:
    found: list[NodeRef] = []
    fx.node.map_aggregate(value, lambda item: found.append(item) if isinstance(item, NodeRef) else None)
    return found


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = nn.modules.batchnorm._BatchNorm
_TRANSPARENT_MODULES = (nn.Identity, nn.Flatten, nn.modules.dropout._DropoutNd, nn.modules.pooling._AvgPoolNd,
                        nn.modules.pooling._AdaptiveAvgPoolNd)
_TRANSPARENT_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.squeeze, torch.unsqueeze, torch.reshape, torch.mean, torch.sum, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.dropout,
}
_TRANSPARENT_METHODS = {"flatten", "squeeze", "unsqueeze", "reshape", "view", "mean", "sum", "contiguous",
                        "__getitem__"}
_SUMS = {operator.add, operator.iadd, torch.add}
_SCALINGS = {operator.truediv, operator.mul, operator.itruediv, operator.imul, torch.div, torch.mul}


def is_vector(shape: tuple[int, ...]) -> bool:
    """Whether a per-sample ``shape`` is one vector: ``(C,)``, or ``(C, 1, 1)`` as a pooling keeps it (Hugging
    Face ResNet's ``pooler_output``)."""
    return len(shape) >= 1 and all(size == 1 for size in shape[1:])


def returned_tensor(traced: TracedModel, chain: tuple[str, ...]) -> str | None:
    """The tensor the model returns: a structured output's ``image_embeds``, else its ``pooler_output``, else the
    returned tensor the dominator ``chain`` ends in; ``nn.Identity`` calls skipped."""
    returned = output_node(traced.graph).args[0]
    chosen = None
    if isinstance(returned, dict):
        chosen = next((returned[key] for key in OUTPUT_FIELDS if isinstance(returned.get(key), fx.Node)), None)
    if chosen is None:
        chosen = next((traced.nodes[name] for name in reversed(chain) if traced.nodes[name].op != "output"), None)
    while chosen is not None and chosen.op == "call_module" and isinstance(
            traced.graph_module.get_submodule(chosen.target), nn.Identity) and chosen.args:
        chosen = chosen.args[0] if isinstance(chosen.args[0], fx.Node) else None
    return chosen.name if chosen is not None and chosen.op not in ("placeholder", "get_attr") else None


class _Reader:
    """Reads the graph backwards from the returned tensor."""

    def __init__(self, traced: TracedModel, shapes: dict[str, NodeShape]):
        self.traced, self.shapes, self.nodes = traced, shapes, traced.nodes

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.traced.graph_module.get_submodule(node.target) if node.op == "call_module" else None

    def linear_input(self, node: fx.Node) -> fx.Node | None:
        """The input of ``node`` if it is a linear map (one per position: a 1x1 convolution, not a 3x3)."""
        module = self.module(node)
        if isinstance(module, nn.Linear) or isinstance(module, _CONV) and set(module.kernel_size) == {1} \
                and module.groups == 1:
            return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if node.op != "call_function":
            return None
        tensors = [arg for arg in node.args[:2] if isinstance(arg, fx.Node)]
        if node.target is F.linear and len(tensors) == 2 and self._parameter(tensors[1]):
            return tensors[0]
        if node.target in (operator.matmul, torch.matmul) and len(tensors) == 2 and self._parameter(tensors[1]) \
                and not self._parameter(tensors[0]):
            return tensors[0]
        return None

    def _parameter(self, node: fx.Node) -> bool:
        """A parameter or a transform of one only (``self.proj.t()``), not computed from the input."""
        if node.op == "get_attr":
            return True
        return node.op in ("call_method", "call_function") and bool(node.all_input_nodes) and all(
            self._parameter(arg) for arg in node.all_input_nodes)

    def transparent_input(self, node: fx.Node) -> fx.Node | None:
        """The one tensor input of an operation that selects, moves or averages values without mixing features."""
        module = self.module(node)
        transparent = isinstance(module, _TRANSPARENT_MODULES) if module is not None else (
            node.op == "call_function" and node.target in _TRANSPARENT_FUNCTIONS
            or node.op == "call_method" and node.target in _TRANSPARENT_METHODS)
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return first if transparent and first is not None and first.name in self.shapes else None

    def branches(self, node: fx.Node) -> list[fx.Node] | None:
        """The tensor operands of a sum of tensors, a stack of tensors on a new first axis (which a mean over it
        averages), or a scaling by a number or by a weight computed from parameters only (EfficientViM's softmax of
        its head weights)."""
        if node.op != "call_function":
            return None
        if node.target is torch.stack and node.args and isinstance(node.args[0], (list, tuple)) and \
                (node.args[1:] or [node.kwargs.get("dim", 0)])[0] == 0:
            stacked = list(node.args[0])
            return stacked if all(isinstance(arg, fx.Node) and arg.name in self.shapes for arg in stacked) else None
        tensors = [arg for arg in node.args if isinstance(arg, fx.Node) and arg.name in self.shapes]
        if node.target in _SUMS and len(tensors) == 2 == len(node.args):
            return tensors
        if node.target in _SCALINGS and len(node.args) == 2:  # by a number, or a weight the parameters give
            computed = [arg for arg in tensors if not self._parameter(arg)]
            factors = [arg for arg in node.args if arg not in computed]
            if len(computed) == 1 and all(isinstance(arg, (int, float)) or isinstance(arg, fx.Node) and
                                          self._parameter(arg) for arg in factors):
                return computed
        return None

    def map_input(self, linear: fx.Node) -> fx.Node:
        """What a final linear map stands for once removed: its input, or, where a batch norm (an affine map per
        channel in eval) and dropout feed it and nothing else (a ``NormLinear`` head: norm, dropout, linear), the
        norm's input, as timm's ``pre_logits`` reads it."""
        source = self.linear_input(linear)
        absorbed, node = [], source
        while len(node.users) == 1 and node.args and isinstance(node.args[0], fx.Node):
            module = self.module(node)
            if not isinstance(module, (_BATCH_NORMS, nn.Identity, nn.modules.dropout._DropoutNd)):
                break
            absorbed.append(node)
            node = node.args[0]
        norms = [index for index, node in enumerate(absorbed) if isinstance(self.module(node), _BATCH_NORMS)]
        return absorbed[norms[-1]].args[0] if norms else source

    def features_kept(self, node: fx.Node, linear: fx.Node) -> bool:
        """Whether ``node`` (computed from the linear map ``linear`` by transparent operations) keeps its output
        features: the features' axis (the last for a linear layer or a product, the first per sample for a
        convolution) has the same size."""
        kept, produced = self.shapes.get(node.name), self.shapes.get(linear.name)
        if kept is None or produced is None or not kept.shape or not produced.shape:
            return False
        convolution = isinstance(self.module(linear), _CONV)
        return (kept.shape[0] == produced.shape[0]) if convolution else (kept.shape[-1] == produced.shape[-1])

    def final_linear(self, node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
        """``(linear maps, transparent operations)`` from which ``node`` is computed by transparent operations,
        and which nothing else reads (a residual sum ``x + mlp(x)`` of two linear maps is no pair of heads), or
        ``None`` where it is computed otherwise."""
        found = self._final_linear(node)
        if found is None:
            return None
        inside = {*found[0], *found[1], node}
        readers = {user for member in inside - {node} for user in member.users if member in data_inputs(user)}
        return found if readers <= inside else None

    def _final_linear(self, node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
        if self.linear_input(node) is not None:
            inner = self.final_linear(self.linear_input(node))
            return ([node, *inner[0]], inner[1]) if inner is not None else ([node], [])
        following = self.transparent_input(node)
        if following is not None:
            found = self.final_linear(following)
            if found is not None and all(self.features_kept(node, linear) for linear in found[0][:1]):
                return found[0], [node, *found[1]]
            return None
        operands = self.branches(node)
        if operands:
            found = [self.final_linear(operand) for operand in operands]
            if all(item is not None for item in found):
                return [m for item in found for m in item[0]], [node] + [op for item in found for op in item[1]]
        return None


def find_final_maps(traced: TracedModel, shapes: dict[str, NodeShape], chain: tuple[str, ...]) -> FinalMaps:
    """The returned tensor, its final linear maps, and the ``pooled`` node or replay."""
    output = returned_tensor(traced, chain)
    if output is None or output not in shapes:
        return FinalMaps(output=None)
    reader = _Reader(traced, shapes)
    found = reader.final_linear(traced.nodes[output])
    if found is None:
        return FinalMaps(output=output, pooled=output, shape=shapes[output].shape)
    linear, operations = found
    linear = list(dict.fromkeys(linear))
    first_inputs = {}  # each final linear map -> the node it stands for once the final maps are removed
    order = {node: index for index, node in enumerate(traced.graph.nodes)}
    for node in sorted(linear, key=order.__getitem__):  # a projection before the classifier reading it
        source = reader.map_input(node)
        first_inputs[node.name] = first_inputs.get(source.name, source.name)
    replay, pooled = _replay(sorted(set(operations), key=order.__getitem__), first_inputs, reader, output)
    shape = _replay_shape(traced, shapes, replay) if replay else shapes[pooled].shape
    if shape is None:  # the replay does not run on the linear maps' inputs (heads of several widths)
        replay, pooled, shape = _concatenated(shapes, [first_inputs[node.name] for node in sorted(
            linear, key=order.__getitem__)])
    return FinalMaps(output=output, linear=tuple(node.name for node in linear), pooled=pooled, replay=replay,
                     shape=tuple(shape))


def _concatenated(shapes: dict[str, NodeShape], inputs: list[str]) -> tuple[tuple[ReplayStep, ...], str, tuple]:
    """Where the heads' inputs cannot be combined as their outputs are (vectors of several widths, as CrossViT's
    branches): their concatenation, as timm's ``pre_logits``; one input: that input."""
    inputs = list(dict.fromkeys(inputs))
    if len(inputs) == 1 or not all(len(shapes[name].shape) == 1 for name in inputs):
        return (), inputs[-1], shapes[inputs[-1]].shape
    step = ReplayStep("pooled_cat", "call_function", torch.cat, ([NodeRef(name) for name in inputs],), {"dim": -1})
    return (step,), step.name, (sum(shapes[name].shape[0] for name in inputs),)


def _replay(operations: list[fx.Node], first_inputs: dict[str, str], reader: _Reader, output: str
            ) -> tuple[tuple[ReplayStep, ...], str]:
    """The steps recomputing ``output`` without the final linear maps, and the name ``pooled`` reads. Identity
    calls are dropped; so is a sum of two heads reading one input, with its halving (two heads on one input,
    averaged): it stands for that input."""
    stands_for: dict[str, str] = dict(first_inputs)
    halved: set[str] = set()  # sums of a value with itself, left out
    steps: list[ReplayStep] = []

    def ref(item: Any) -> Any:
        return NodeRef(stands_for.get(item.name, item.name)) if isinstance(item, fx.Node) else item

    for node in operations:
        args, kwargs = fx.node.map_aggregate(node.args, ref), fx.node.map_aggregate(node.kwargs, ref)
        if isinstance(reader.module(node), nn.Identity):
            stands_for[node.name] = args[0].name
            continue
        shared = _shared_input(node, first_inputs) if reader.branches(node) else None
        if shared is not None:
            stands_for[node.name] = shared
            halved.add(node.name)
            continue
        if node.target in _SCALINGS and reader.branches(node) and _averages(node, halved):
            stands_for[node.name] = args[0].name
            continue
        steps.append(ReplayStep(f"pooled_{node.name}", node.op, node.target, tuple(args), dict(kwargs)))
        stands_for[node.name] = steps[-1].name
    kept = _needed(steps, stands_for[output])
    return kept, stands_for[output]


def _shared_input(node: fx.Node, first_inputs: dict[str, str]) -> str | None:
    """For a sum of two final linear maps that stand for one input (two heads on one tensor, as LeViT's), that
    input."""
    if node.target not in _SUMS or not all(arg.name in first_inputs for arg in node.args):
        return None
    inputs = {first_inputs[arg.name] for arg in node.args}
    return inputs.pop() if len(inputs) == 1 else None


def _averages(node: fx.Node, halved: set[str]) -> bool:
    """Whether a scaling halves (divides by 2, multiplies by 0.5) a sum of a value with itself: its average."""
    value, factor = node.args
    if not isinstance(value, fx.Node):
        value, factor = factor, value
    if not isinstance(value, fx.Node) or value.name not in halved:
        return False
    halving = node.target in (operator.truediv, operator.itruediv, torch.div) and factor == 2
    return halving or node.target in (operator.mul, operator.imul, torch.mul) and factor == 0.5


def _needed(steps: list[ReplayStep], result: str) -> tuple[ReplayStep, ...]:
    """The steps ``result`` is computed from."""
    by_name = {step.name: step for step in steps}
    needed, pending = set(), [result]
    while pending:
        name = pending.pop()
        if name in by_name and name not in needed:
            needed.add(name)
            pending.extend(ref.name for ref in by_name[name].references())
    return tuple(step for step in steps if step.name in needed)


def _replay_shape(traced: TracedModel, shapes: dict[str, NodeShape], replay: tuple[ReplayStep, ...]
                  ) -> tuple[int, ...] | None:
    """Per-sample shape of the replay's result, run on meta tensors of the probe's shapes (``None``: it fails)."""
    values: dict[str, Any] = {}

    def value(item: Any) -> Any:
        if not isinstance(item, NodeRef):
            return item
        if item.name not in values:
            values[item.name] = torch.empty((PROBE_BATCH, *shapes[item.name].shape), device="meta")
        return values[item.name]

    try:
        for step in replay:
            args, kwargs = fx.node.map_aggregate(step.args, value), fx.node.map_aggregate(step.kwargs, value)
            values[step.name] = _call(traced, step, args, kwargs)
    except Exception:  # shapes baked into a reshape for the linear map's output, say
        return None
    result = values[replay[-1].name]
    return tuple(result.shape[1:]) if isinstance(result, torch.Tensor) and result.shape[:1] == (PROBE_BATCH,) \
        else None


def _call(traced: TracedModel, step: ReplayStep, args: tuple, kwargs: dict) -> Any:
    function: Callable
    if step.op == "call_module":
        function = traced.graph_module.get_submodule(step.target)
    elif step.op == "call_method":
        function = getattr(args[0], step.target)
        args = args[1:]
    else:
        function = step.target
    return function(*args, **kwargs)
