"""Inference pass (CPU): oneDNN convolutions and linear layers with packed weights and fused activations.

On the CPU, PyTorch runs convolutions and linear layers with oneDNN, which computes fastest with the weight
reordered ("packed") for the input's shape, and can apply an activation to each output while it is still in
cache (a *post-op*). PyTorch's ``F.conv2d`` packs the weight again on every call, which costs as much as the
convolution itself for a large weight on a small map (ResNet-50's last stage at batch 1: 0.9 ms unpacked, 0.4 ms
packed), and ``F.gelu(F.linear(x, w, b))`` makes three passes over the output (bias, product, activation) where
one suffices (ConvNeXt-T's ``fc1`` at batch 1, 3136 x 96 -> 384: 1.09 ms, 0.89 ms packed and fused; measured
on a 2-core Xeon).

The pass replaces every plain ``nn.Conv2d`` (numeric padding, zeros padding mode) and ``nn.Linear`` call by a
:class:`OneDNNConv2d` / :class:`OneDNNLinear`, which packs the weight once per input shape and, where the
layer is called once and its only reader is an activation oneDNN applies (ReLU, ReLU6/Hardtanh, LeakyReLU, SiLU,
GELU, Hardswish, Hardsigmoid, Sigmoid, Tanh; module, function or method, in place or not), applies that too.
They run oneDNN for float32 inference on CPU tensors (channels-last maps for convolutions) and the plain ops
everywhere else (another device or dtype, autograd on, a layer too small to repay a call to oneDNN), so the
module computes the same thing wherever it is moved.

A first pass, :func:`fuse_residual_sums`, takes a convolution's residual sum too: ``relu(conv(x) + shortcut)``
(ResNet's bottleneck, after its batch norm is folded) becomes one :class:`OneDNNConv2dAdd` call (oneDNN's *binary*
post-op) that writes the result into ``shortcut`` where the data flow proves nothing reads it afterwards, so the
output is never written, then read back and written again by the sum and the ReLU.

The passes are for float32 inference on the CPU; ``optimize_for_inference`` runs them there only.

Example:
    >>> import torch, torchvision, fxfeat
    >>> from fxfeat.optimize import inference_copy
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(1,)).eval()
    >>> module = inference_copy(extractor)
    >>> use_onednn(module)   # five convolutions; batch norms not folded here, so no activation fused
    5
    >>> module.get_submodule("layer1.0.conv1")
    OneDNNConv2d(64, 64, kernel_size=(3, 3), stride=[1, 1], padding=[1, 1], activation=none)
    >>> fast = fxfeat.optimize_for_inference(extractor)   # batch norms folded, then the sums fused
    >>> fast.optimizations["fuse_residual_sums"], fast.get_submodule("layer1.0.conv2").overwrite_other
    (2, True)
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxfeat.analyse.aliases import annotate_aliases
from fxfeat.passes.graph_edits import call_counts, value_readers
from fxfeat.passes.in_place import Overwrites, is_tensor
from fxfeat.runtime.in_place import add_in_place
from fxfeat.runtime.onednn import OneDNNConv2d, OneDNNConv2dAdd, OneDNNLinear

__all__ = ["fuse_residual_sums", "use_onednn"]

_MODULE_ACTIVATIONS = {
    nn.ReLU: lambda m: ("relu", [], ""),
    nn.ReLU6: lambda m: ("hardtanh", [0.0, 6.0], ""),
    nn.Hardtanh: lambda m: ("hardtanh", [float(m.min_val), float(m.max_val)], ""),
    nn.LeakyReLU: lambda m: ("leaky_relu", [float(m.negative_slope)], ""),
    nn.SiLU: lambda m: ("swish", [], ""),
    nn.GELU: lambda m: ("gelu", [], m.approximate),
    nn.Hardswish: lambda m: ("hardswish", [], ""),
    nn.Hardsigmoid: lambda m: ("hardsigmoid", [], ""),
    nn.Sigmoid: lambda m: ("sigmoid", [], ""),
    nn.Tanh: lambda m: ("tanh", [], ""),
}
_FUNCTION_ACTIVATIONS = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.silu: "swish", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", torch.sigmoid: "sigmoid", torch.sigmoid_: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", torch.tanh_: "tanh", F.tanh: "tanh", F.gelu: "gelu", F.relu6: "relu6",
    F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
                       "tanh_": "tanh"}


def _activation(module: fx.GraphModule, node: fx.Node) -> tuple[str, list[float], str] | None:
    """The oneDNN post-op computing ``node`` from its first argument, or ``None``."""
    if node.op == "call_module":
        layer = module.get_submodule(node.target)
        make = _MODULE_ACTIVATIONS.get(type(layer))
        return make(layer) if make is not None and len(node.args) == 1 and not node.kwargs else None
    if node.op == "call_method":
        name = _METHOD_ACTIVATIONS.get(node.target)
        return (name, [], "") if name is not None and len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function" or node.target not in _FUNCTION_ACTIVATIONS:
        return None
    arguments = node.normalized_arguments(module, normalize_to_only_use_kwargs=True)
    if arguments is None:
        return None
    kwargs = {key: value for key, value in arguments.kwargs.items() if key not in ("input", "self", "inplace")}
    name = _FUNCTION_ACTIVATIONS[node.target]
    if any(isinstance(value, fx.Node) for value in kwargs.values()):
        return None
    if name == "gelu":
        approximate = kwargs.get("approximate", "none")
        return ("gelu", [], approximate) if approximate in ("none", "tanh") else None
    if name == "leaky_relu":
        return "leaky_relu", [float(kwargs.get("negative_slope", 0.01))], ""
    if name == "hardtanh":
        return "hardtanh", [float(kwargs.get("min_val", -1.0)), float(kwargs.get("max_val", 1.0))], ""
    if name == "relu6":
        return "hardtanh", [0.0, 6.0], ""
    return name, [], ""


def _convertible(layer: nn.Module) -> bool:
    """A plain ``nn.Linear``, or a plain ``nn.Conv2d`` oneDNN runs (numeric padding, zeros padding)."""
    if type(layer) is nn.Linear:
        return True
    return type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _fused_activation(module: fx.GraphModule, node: fx.Node, calls: dict[str, int]):
    """The activation node reading ``node``'s layer and its post-op, if the two can run as one call."""
    if len(node.args) != 1 or node.kwargs or calls[node.target] != 1:
        return None, None
    readers = value_readers(node)
    if len(readers) != 1 or readers[0].args[0] is not node:
        return None, None
    activation = _activation(module, readers[0])
    return (readers[0], activation) if activation is not None else (None, None)


def use_onednn(module: fx.GraphModule) -> int:
    """Replace the plain convolutions and linear layers of ``module``'s graph by :class:`OneDNNConv2d` /
    :class:`OneDNNLinear`, each with the activation after it where it can take it (``module`` is changed in
    place); returns how many layers were replaced."""
    calls = call_counts(module.graph)
    replaced = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or node.target not in calls:
            continue
        layer = module.get_submodule(node.target)
        if not _convertible(layer):
            continue
        activation_node, activation = _fused_activation(module, node, calls)
        onednn = OneDNNConv2d if isinstance(layer, nn.Conv2d) else OneDNNLinear
        module.set_submodule(node.target, onednn(layer, activation or ("none", [], "")))
        calls.pop(node.target)  # converted once for all its calls
        if activation_node is not None:
            activation_node.replace_all_uses_with(node)
            module.graph.erase_node(activation_node)
        replaced += 1
    return replaced


_SUM_FUNCTIONS = {operator.add, torch.add, add_in_place}


def _sum_operand(node: fx.Node, summand: fx.Node) -> fx.Node | None:
    """If ``node`` is ``summand + other`` or ``other + summand`` of two tensors of one shape and dtype (no
    broadcasting, no ``alpha``), ``other``; else ``None``."""
    is_sum = (node.op == "call_function" and node.target in _SUM_FUNCTIONS) or \
        (node.op == "call_method" and node.target == "add")
    if not is_sum or len(node.args) != 2 or node.kwargs or not all(isinstance(arg, fx.Node) for arg in node.args):
        return None
    other = node.args[1] if node.args[0] is summand else node.args[0]
    if other is summand or not is_tensor(other) or not is_tensor(summand):
        return None
    mine, theirs = summand.meta["tensor_meta"], other.meta["tensor_meta"]
    return other if (mine.shape, mine.dtype) == (theirs.shape, theirs.dtype) else None


def fuse_residual_sums(module: fx.GraphModule) -> int:
    """Replace each plain ``nn.Conv2d`` called once whose only reader is a sum with another tensor of its shape
    (``conv(x) + shortcut``), and the ReLU reading that sum if it is the sum's only reader, by one
    :class:`OneDNNConv2dAdd` call where the sum was (``module`` is changed in place; the pass needs the shapes
    ``ShapeProp`` records). The sum is written into the shortcut when the data flow proves nothing reads it
    afterwards and it does not share the convolution input's storage. A convolution whose input is written
    between the convolution and the sum stays apart (the fused call reads the input where the sum was).
    Returns how many sums were fused.
    """
    fused = 0
    for conv, total, relu, overwrite in _residual_sums(module):
        shape_reads = _shape_reads_before(module.graph, conv, total)
        if shape_reads is None:
            continue
        x, shortcut = conv.args[0], total.args[1] if total.args[0] is conv else total.args[0]
        layer = module.get_submodule(conv.target)
        module.set_submodule(conv.target, OneDNNConv2dAdd(layer, ("relu", [], "") if relu else ("none", [], ""),
                                                          overwrite_other=overwrite))
        total.op, total.target, total.args, total.kwargs = "call_module", conv.target, (x, shortcut), {}
        for read in reversed(shape_reads):  # `x.ndim` checks of the convolution's output read the sum's
            total.append(read)
            read.replace_input_with(conv, total)
        module.graph.erase_node(conv)
        if relu is not None:
            relu.replace_all_uses_with(total)
            module.graph.erase_node(relu)
        fused += 1
    return fused


def _residual_sums(module: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node | None, bool]]:
    """``(convolution, sum, ReLU or None, whether the sum may overwrite the shortcut)`` for each fusion
    :func:`fuse_residual_sums` makes, decided on the graph before any of them (a fused call is not a module the
    data-flow analysis knows)."""
    annotate_aliases(module.graph, module, tensor_nodes=None)
    overwrites = Overwrites(module)
    aliases, order = overwrites.aliases, overwrites.aliases.order
    calls = call_counts(module.graph)
    fusions, sums = [], set()
    for conv in module.graph.nodes:
        if conv.op != "call_module" or calls[conv.target] != 1 or len(conv.args) != 1 or conv.kwargs \
                or not isinstance(conv.args[0], fx.Node):
            continue
        conv_readers = value_readers(conv)
        if len(conv_readers) != 1:
            continue
        layer = module.get_submodule(conv.target)
        total, x = conv_readers[0], conv.args[0]
        shortcut = _sum_operand(total, conv)
        if type(layer) is not nn.Conv2d or not _convertible(layer) or shortcut is None or total in sums:
            continue
        if any(order[conv.name] < order[write] < order[total.name] for write in aliases.writes_to(x.name)):
            continue
        readers = value_readers(total)
        relu = readers[0] if len(readers) == 1 and readers[0].args[:1] == (total,) and \
            _activation(module, readers[0]) == ("relu", [], "") else None
        overwrite = overwrites.may_overwrite(total, shortcut) and aliases.base(shortcut.name) != aliases.base(x.name)
        fusions.append((conv, total, relu, overwrite))
        sums.add(total)
    return fusions


def _shape_reads_before(graph: fx.Graph, conv: fx.Node, total: fx.Node) -> list[fx.Node] | None:
    """The nodes before ``total`` computed from ``conv``'s shape, dtype or device (a library norm's ``x.ndim``
    check), in graph order, to run after the fused call instead (the sum has the convolution's shape); ``None`` if
    ``total`` itself needs one of them."""
    position = {node: index for index, node in enumerate(graph.nodes)}
    reads, pending = set(), [user for user in conv.users if user is not total]
    while pending:
        node = pending.pop()
        if node is total:
            return None
        if node not in reads and position[node] < position[total]:
            reads.add(node)
            pending.extend(node.users)
    return sorted(reads, key=position.__getitem__)
