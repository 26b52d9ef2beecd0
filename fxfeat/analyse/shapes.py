"""Shapes, layouts and spatial reductions of every node, from probe runs of the traced graph.

The graph is run twice with ``torch.fx``'s ``ShapeProp``: at the probe size and at a second, non-square size.
A dimension that changes with the input size is spatial, one that does not is batch or channels. That tells
``NCHW`` from ``NHWC`` maps (and ``NLC`` tokens) without reading any dimension blindly, and it tells a real
feature map from a fixed-size one (the 7x7 output of an adaptive pooling is not a feature map). Models that
only accept their native size fall back to one probe and a rule on equal dimensions.

Probes run on the ``meta`` device (shapes without arithmetic; shape-preserving ops such as normalisations and
activations pass their input through) and fall back to real tensors when an op has no meta implementation or
mixes devices.

Example:
    >>> import torch, torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse.shapes import propagate_shapes
    >>> traced = trace_model(torchvision.models.resnet18().eval())
    >>> maps = propagate_shapes(traced.graph_module, (3, 224, 224))
    >>> maps["layer2_1_relu_1"]
    NodeShape(shape=(128, 28, 28), fmt='NCHW', reduction=8)
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from fxfeat.errors import ShapePropagationError
from fxfeat.trace import describe_node

__all__ = ["NodeShape", "propagate_shapes", "second_probe_size", "reduction_of"]

PROBE_BATCH = 2
_MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class NodeShape:
    """Shape and layout of one tensor-valued node at the probe size.

    Attributes:
        shape: per-sample shape (batch dimension left out).
        fmt: ``"NCHW"``/``"NHWC"`` for feature maps, ``"NLC"``/``"NCL"`` for token sequences, ``None`` for
            everything else (vectors, fixed-size maps, 5-D tensors...).
        reduction: spatial reduction relative to the input (a power of two), ``None`` if ``fmt`` is ``None``.
    """

    shape: tuple[int, ...]
    fmt: str | None = None
    reduction: int | None = None

    @property
    def is_map(self) -> bool:
        return self.fmt in ("NCHW", "NHWC")

    @property
    def channels(self) -> int | None:
        if self.fmt in ("NCHW", "NCL"):
            return self.shape[0]
        if self.fmt in ("NHWC", "NLC"):
            return self.shape[-1]
        return None


def reduction_of(size: int, input_size: int) -> int:
    """The largest power of two ``r`` with ``ceil(input_size / r) >= size``.

    Robust to "valid" convolutions, which lose a few pixels (Inception: 299 -> 149 is a reduction of 2).

    >>> reduction_of(149, 299), reduction_of(35, 299), reduction_of(8, 299), reduction_of(7, 224)
    (2, 8, 32, 32)
    """
    reduction = 1
    while math.ceil(input_size / (reduction * 2)) >= size and reduction < input_size:
        reduction *= 2
    return reduction


def second_probe_size(height: int, width: int) -> tuple[int, int]:
    """A second, non-square probe size that keeps the probe's divisibility by 32 and grows every map down to
    reduction 64 in both dimensions (and to 128 in width).

    >>> second_probe_size(224, 224)
    (288, 352)
    """
    return height + 64, width + 128


# Ops whose output has the shape, dtype and device of their first argument. On the meta device many of them
# run as slow Python decompositions; since a meta tensor holds no data, the probe passes the input through.
_SHAPE_PRESERVING_MODULES = (
    nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
)
_SHAPE_PRESERVING_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.dropout,
    F.layer_norm, F.group_norm, F.batch_norm, torch.relu, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
}


def _is_meta(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "meta"


class _NodeFailed(Exception):
    """A probe failed at ``node``; ``__cause__`` is the op's own error."""

    def __init__(self, node: fx.Node):
        super().__init__(node.format_node())
        self.node = node


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that skips the arithmetic of shape-preserving ops on meta tensors and reports the node
    that failed (with the op's own error as the cause)."""

    def run_node(self, n):
        try:
            return super().run_node(n)
        except Exception as error:
            raise _NodeFailed(n) from (error.__cause__ or error)  # ShapeProp wraps the op's error

    def call_module(self, target, args, kwargs):
        if args and _is_meta(args[0]) and isinstance(self.fetch_attr(target), _SHAPE_PRESERVING_MODULES):
            return args[0]
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if args and _is_meta(args[0]) and target in _SHAPE_PRESERVING_FUNCTIONS:
            return args[0]
        return super().call_function(target, args, kwargs)


class _MetaShapeProp(nn.Module):
    """Runs the propagation inside ``torch.func.functional_call`` so parameters can be swapped for meta ones."""

    def __init__(self, graph_module: fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, example: torch.Tensor):
        return _ShapeProp(self.graph_module).propagate(example)


def _run_probe(graph_module: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-node shapes (batch included) of one propagation; meta first, real tensors as the fallback."""
    reference = next(iter(graph_module.parameters()), None)
    dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
    device = reference.device if reference is not None else torch.device("cpu")
    wrapper = _MetaShapeProp(graph_module)
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*wrapper.named_parameters(), *wrapper.named_buffers()]
    }
    with contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints a traceback before re-raising
        try:
            example = torch.empty((PROBE_BATCH, *input_shape), device="meta", dtype=dtype)
            torch.func.functional_call(wrapper, meta_state, (example,))
        except Exception:
            example = torch.randn((PROBE_BATCH, *input_shape), device=device, dtype=dtype)
            with torch.no_grad():
                _ShapeProp(graph_module).propagate(example)
    shapes = {}
    for node in graph_module.graph.nodes:
        meta = node.meta.pop("tensor_meta", None)
        if isinstance(meta, TensorMetadata):
            shapes[node.name] = tuple(int(d) for d in meta.shape)
    return shapes


def _probe(graph_module, input_shape, what: str) -> dict[str, tuple[int, ...]]:
    try:
        return _run_probe(graph_module, input_shape)
    except Exception as error:
        node = error.node if isinstance(error, _NodeFailed) else None
        cause = error.__cause__ if node is not None else error
        where = f" at {describe_node(node)}" if node else ""
        failure = ShapePropagationError(
            f"Running the traced model on a {what} probe input of shape {(PROBE_BATCH, *input_shape)} failed"
            f"{where}: {type(cause).__name__}: {cause}".strip(),
            hint="pass input_size=(C, H, W) with a size the model accepts.",
        )
        failure.node, failure.cause = node, cause
        raise failure from cause


def propagate_shapes(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> dict[str, NodeShape]:
    """Shape, layout and reduction of every tensor-valued node at ``input_size`` (C, H, W).

    Raises:
        ShapePropagationError: the model fails on a probe input of ``input_size``.
    """
    channels, height, width = input_size
    first = _probe(graph_module, (channels, height, width), "first")
    other_height, other_width = second_probe_size(height, width)
    try:
        second = _run_probe(graph_module, (channels, other_height, other_width))
    except Exception:  # models with fixed-size position embeddings or windows accept one size only
        second = None
    result = {}
    for name, shape in first.items():
        other = second.get(name) if second is not None else None
        if second is not None:
            fmt = _layout_from_two_probes(shape, other)
            sizes = ((height, width), (other_height, other_width))
        else:
            fmt = _layout_from_one_probe(shape, height, width)
            sizes = ((height, width),)
        reduction = _reduction(shape, fmt, sizes, other) if fmt else None
        if reduction is None:
            fmt = None
        result[name] = NodeShape(shape[1:], fmt, reduction)
    return result


def _layout_from_two_probes(shape: tuple[int, ...], other: tuple[int, ...] | None) -> str | None:
    if other is None or len(other) != len(shape):
        return None
    varying = tuple(i for i, (a, b) in enumerate(zip(shape, other)) if a != b)
    return {
        (4, (2, 3)): "NCHW",
        (4, (1, 2)): "NHWC",
        (3, (1,)): "NLC",
        (3, (2,)): "NCL",
    }.get((len(shape), varying))


def _layout_from_one_probe(shape: tuple[int, ...], height: int, width: int) -> str | None:
    def plausible(h: int, w: int) -> bool:  # a 1x1 map is a global pooling's output, not a feature map
        return 1 < h <= height and 1 < w <= width and reduction_of(h, height) == reduction_of(w, width)

    if not shape or shape[0] != PROBE_BATCH:  # windows or heads folded into the batch: not a map
        return None

    if len(shape) == 4:
        if plausible(shape[2], shape[3]):
            return "NCHW"
        if plausible(shape[1], shape[2]):
            return "NHWC"
    if len(shape) == 3 and _token_reduction(((height, width),), (shape[1],)) is not None:
        return "NLC"
    return None


def _token_reduction(sizes, lengths) -> int | None:
    """The reduction at which every probe's token count is one grid plus the same number of prefix tokens."""
    height = sizes[0][0]
    reduction = 1
    while reduction <= height:
        prefixes = {
            length - math.ceil(h / reduction) * math.ceil(w / reduction)
            for (h, w), length in zip(sizes, lengths)
        }
        if len(prefixes) == 1 and 0 <= prefixes.pop() <= _MAX_PREFIX_TOKENS:
            return reduction
        reduction *= 2
    return None


def _reduction(shape, fmt, sizes, other) -> int | None:
    if fmt in ("NCHW", "NHWC"):
        spatial = (2, 3) if fmt == "NCHW" else (1, 2)
        (height, width) = sizes[0]
        h, w = (shape[d] for d in spatial)
        growth = other[spatial[1]] - w if other is not None else 0
        if growth > 0:  # how much the map widens when the input widens: blind to padding and valid convolutions
            return max(1, 2 ** round(math.log2((sizes[1][1] - sizes[0][1]) / growth)))
        return min(reduction_of(h, height), reduction_of(w, width))
    length_dim = 1 if fmt == "NLC" else 2
    lengths = (shape[length_dim],) if other is None else (shape[length_dim], other[length_dim])
    return _token_reduction(sizes, lengths)
