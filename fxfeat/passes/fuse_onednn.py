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

import copy
import math
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxfeat.analyse.aliases import annotate_aliases
from fxfeat.passes.graph_edits import call_counts, finished, value_readers
from fxfeat.passes.in_place import Overwrites, add_in_place, is_tensor

__all__ = ["OneDNNConv2d", "OneDNNConv2dAdd", "OneDNNLinear", "fuse_residual_sums", "onednn_available", "use_onednn"]

# oneDNN post-op name -> the same activation in PyTorch, given the post-op's scalars and algorithm.
_ACTIVATIONS = {
    "relu": lambda x, scalars, algorithm: F.relu(x),
    "hardtanh": lambda x, scalars, algorithm: F.hardtanh(x, scalars[0], scalars[1]),
    "leaky_relu": lambda x, scalars, algorithm: F.leaky_relu(x, scalars[0]),
    "swish": lambda x, scalars, algorithm: F.silu(x),
    "gelu": lambda x, scalars, algorithm: F.gelu(x, approximate=algorithm),
    "hardswish": lambda x, scalars, algorithm: F.hardswish(x),
    "hardsigmoid": lambda x, scalars, algorithm: F.hardsigmoid(x),
    "sigmoid": lambda x, scalars, algorithm: torch.sigmoid(x),
    "tanh": lambda x, scalars, algorithm: torch.tanh(x),
    "none": lambda x, scalars, algorithm: x,
}


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN operators the pass calls."""
    return torch.backends.mkldnn.is_available() and all(
        hasattr(torch.ops.mkldnn, name) for name in ("_convolution_pointwise", "_linear_pointwise",
                                                     "_reorder_linear_weight"))


class _PackedLayer(nn.Module):
    """A layer + activation run by oneDNN with its weight packed per input shape (see the subclasses).

    The packings (one per input shape, at most ``CACHE_SIZE``) are a cache: not in the state dict, not pickled
    or copied, made again when needed. A call doing fewer than ``min_macs`` multiply-adds runs the plain ops:
    oneDNN's operators cost some 25-50 us per call more than PyTorch's, which a small layer does not repay (see
    the subclasses).
    """

    CACHE_SIZE = 4
    MIN_MACS = 2**20

    def __init__(self, layer: nn.Module, activation: tuple[str, list[float], str]):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.activation, self.scalars, self.algorithm = activation
        self._packed: dict[tuple[int, ...], torch.Tensor] = {}

    def _pack(self, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        key = tuple(x.shape)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= self.CACHE_SIZE:
                self._packed.pop(next(iter(self._packed)))
            packed = self._packed[key] = self._pack(key)
        return packed

    @property
    def min_macs(self) -> int:
        return self.MIN_MACS

    def _on_onednn(self, x: torch.Tensor, macs: int) -> bool:
        return macs >= self.min_macs and x.dtype is torch.float32 and not torch.is_grad_enabled() \
            and x.device.type == "cpu" and self.weight.dtype is torch.float32

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "none":
            return y
        return _ACTIVATIONS[self.activation](y, self.scalars, self.algorithm)

    def _apply(self, fn, recurse=True):
        self._packed = {}  # .to(), .half(): the packings describe the old weight
        return super()._apply(fn, recurse)

    def __getstate__(self):
        return {**self.__dict__, "_packed": {}}

    def __deepcopy__(self, memo):
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__getstate__(), memo))
        return copied


class OneDNNConv2d(_PackedLayer):
    """``activation(F.conv2d(x, weight, bias, ...))``, by oneDNN on channels-last CPU maps (see the module
    docstring).

    Grouped and depthwise convolutions always run on oneDNN: PyTorch's channels-last kernels for them were slower
    at all but the largest sizes measured (a depthwise 3x3 of 96 channels on 7x7: 57 us, packed 48 us; groups of
    24 channels, 576 on 7x7: 207 us and 130 us; but groups of 24, 216 channels, batch 8 on 28x28: 2.8 ms and
    4.3 ms). A dense convolution doing fewer than ``MIN_MACS`` (2^23) multiply-adds per call runs ``F.conv2d``: a
    1x1 convolution 320 -> 1280 on a 2x2 map (1.6 M) takes 46 us in PyTorch, 71 us packed; on 7x7 (20 M), 213 us
    and 201 us; 2048 -> 512 on 7x7 (51 M), 908 us and 381 us (a 2-core Xeon, batch 1 unless said).
    """

    MIN_MACS = 2**23

    @property
    def min_macs(self) -> int:
        return 0 if self.groups > 1 else self.MIN_MACS

    def __init__(self, conv: nn.Conv2d, activation: tuple[str, list[float], str] = ("none", [], "")):
        super().__init__(conv, activation)
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self._weight_numel = conv.weight.numel()

    def _pack(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch._C._nn.mkldnn_reorder_conv2d_weight(self.weight.to_mkldnn(), self.padding, self.stride,
                                                         self.dilation, self.groups, list(shape))

    def _runs_onednn(self, x: torch.Tensor) -> bool:
        if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
            return False
        shape = x.shape
        return self._on_onednn(x, shape[0] * (shape[2] // self.stride[0]) * (shape[3] // self.stride[1])
                               * self._weight_numel)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._runs_onednn(x):
            return torch.ops.mkldnn._convolution_pointwise(
                x, self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.activation, self.scalars, self.algorithm)
        return self._activate(self._conv(x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, activation={self.activation}")


class OneDNNConv2dAdd(OneDNNConv2d):
    """``activation(F.conv2d(x, weight, bias, ...) + other)``, ``activation`` ReLU or none: a convolution, the
    residual sum after it and the ReLU after that in one oneDNN call (a *binary* post-op), written into ``other``
    when ``overwrite_other`` (the pass proved that nothing reads ``other`` afterwards) and the sum has its
    shape, dtype and layout. Measured on a 2-core Xeon, batch 1, channels-last (ResNet-50's ``conv3`` of
    ``layer1``, 64 -> 256 on 56x56): convolution, then ``add_`` and ``relu_``, 830 us; fused into a new tensor,
    560 us; fused into ``other``, 429 us (7x7, 512 -> 2048: 498, 465 and 441 us). Off oneDNN's path (see
    :class:`OneDNNConv2d`), the plain ops.
    """

    def __init__(self, conv: nn.Conv2d, activation: tuple[str, list[float], str] = ("none", [], ""),
                 overwrite_other: bool = False):
        if activation[0] not in ("relu", "none"):
            raise ValueError(f"oneDNN fuses only ReLU after a convolution's sum, not {activation[0]}")
        super().__init__(conv, activation)
        self.overwrite_other = overwrite_other

    def _output_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        spatial = ((size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1 for size, padding, dilation,
                   kernel, stride in zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride))
        return (x.shape[0], self.out_channels, *spatial)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        if self._runs_onednn(x) and other.dtype == x.dtype and other.device == x.device \
                and other.is_contiguous(memory_format=torch.channels_last) and other.shape == self._output_shape(x):
            unary = "relu" if self.activation == "relu" else None
            arguments = (self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups,
                         "add", None, unary, [], None)
            if self.overwrite_other:
                return torch.ops.mkldnn._convolution_pointwise_.binary(other, x, *arguments)
            return torch.ops.mkldnn._convolution_pointwise.binary(x, other, *arguments)
        total = add_in_place(self._conv(x), other)  # into the convolution's new output when the shapes allow
        return total.relu_() if self.activation == "relu" else total

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, overwrite_other={self.overwrite_other}"


class OneDNNLinear(_PackedLayer):
    """``activation(F.linear(x, weight, bias))``, by oneDNN on CPU tensors (see the module docstring); below
    ``MIN_MACS`` (2^20) multiply-adds per call, ``F.linear`` (oneDNN costs some 6 us more per call)."""

    def __init__(self, linear: nn.Linear, activation: tuple[str, list[float], str] = ("none", [], "")):
        super().__init__(linear, activation)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _pack(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(self.weight, math.prod(shape[:-1]))  # rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and self._on_onednn(x, x.numel() // x.shape[-1] * self.weight.numel()):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(x), self.bias, self.activation,
                                                      self.scalars, self.algorithm)
        return self._activate(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


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
    return finished(module, replaced)


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
    return finished(module, fused)


def _residual_sums(module: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, fx.Node | None, bool]]:
    """``(convolution, sum, ReLU or None, whether the sum may overwrite the shortcut)`` for each fusion
    :func:`fuse_residual_sums` makes, decided on the graph before any of them (a fused call is not a module the
    data-flow analysis knows)."""
    annotate_aliases(module.graph, module, tensors=None)
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
