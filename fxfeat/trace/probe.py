"""Run a traced graph on a probe input, and find the input size a model takes.

A probe runs the graph with ``torch.fx``'s ``ShapeProp`` on the ``meta`` device (shapes without arithmetic;
shape-preserving ops such as normalisations and activations pass their input through) and falls back to real
tensors when an op has no meta implementation or mixes devices. A failing probe names the node that failed.

The size a model declares is not always the one it takes: timm's ``in_chans=1`` models keep the 3-channel
``input_size`` of their ``pretrained_cfg``. :func:`resolved_input_size` reads the number from the graph's first
convolution where a probe of the declared size fails there.

Example:
    >>> import torch.fx
    >>> from torch import nn
    >>> graph_module = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU()))
    >>> run_probe(graph_module, (1, 32, 32))["_1"]
    (2, 8, 15, 15)
    >>> resolved_input_size(graph_module, (3, 32, 32))
    (1, 32, 32)
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

from fxfeat.trace.lock import trace_lock
from fxfeat.trace.metadata import NO_TENSOR
from fxfeat.trace.values import EXAMPLE_BATCH, example_batch

__all__ = ["PROBE_BATCH", "ProbeFailed", "first_convolution_channels", "resolved_input_size", "run_probe"]

PROBE_BATCH = EXAMPLE_BATCH  # the probes run on the batch size of shape-aware tracing's example


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


class ProbeFailed(Exception):
    """A probe failed at ``node``; ``__cause__`` is the op's own error."""

    def __init__(self, node: fx.Node):
        super().__init__(node.format_node())
        self.node = node


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that skips the arithmetic of shape-preserving ops on meta tensors and reports the node
    that failed (with the op's own error as the cause)."""

    def run_node(self, n):
        """Run ``n`` and record its ``tensor_meta`` and ``type`` as ``ShapeProp`` does, without its printing of a
        failing op's traceback to ``sys.stderr`` (silencing it would mean redirecting every thread's stderr)."""
        try:
            result = fx.Interpreter.run_node(self, n)
        except Exception as error:
            raise ProbeFailed(n) from error
        tensors = []

        def metadata(value):
            if not isinstance(value, torch.Tensor):
                return value
            tensors.append(value)
            return _extract_tensor_metadata(value)

        meta = fx.node.map_aggregate(result, metadata)
        if tensors:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result

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


@trace_lock()
def run_probe(graph_module: fx.GraphModule, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-node shapes (batch included) of one propagation; meta first, real tensors as the fallback. The meta
    tensors stand in for the parameters and buffers of ``graph_module``'s modules (the model's own) for the
    duration, under :func:`~fxfeat.trace.lock.trace_lock`."""
    wrapper = _MetaShapeProp(graph_module)
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*wrapper.named_parameters(), *wrapper.named_buffers()]
    }
    try:
        example = example_batch(graph_module, input_shape, PROBE_BATCH, device="meta")
        torch.func.functional_call(wrapper, meta_state, (example,))
    except Exception:
        example = example_batch(graph_module, input_shape, PROBE_BATCH)
        with torch.no_grad():
            _ShapeProp(graph_module).propagate(example)
    shapes = {}
    for node in graph_module.graph.nodes:
        meta = node.meta.pop("tensor_meta", None)
        if isinstance(meta, TensorMetadata):
            shapes[node.name] = tuple(int(d) for d in meta.shape)
        # A value holding no tensor (a size, a shape tuple a leaf function returns) is metadata, not data flow.
        node.meta[NO_TENSOR] = meta is None and node.op in ("call_function", "call_method", "call_module")
    return shapes


def _first_convolution(graph_module: fx.GraphModule) -> tuple[fx.Node, nn.modules.conv._ConvNd] | None:
    """The first ``call_module`` node of the graph whose module is or holds a convolution, and that convolution."""
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            convolution = next((layer for layer in graph_module.get_submodule(node.target).modules()
                                if isinstance(layer, nn.modules.conv._ConvNd)), None)
            if convolution is not None:
                return node, convolution
    return None


def first_convolution_channels(graph_module: fx.GraphModule, node: fx.Node | None) -> int | None:
    """The input channels of the graph's first convolution if ``node`` calls it (the convolution, or a module
    kept whole that holds it: Hugging Face's embeddings check the channels first), else ``None``.

    A probe failing there most likely had the wrong number of channels: a model built for another number than
    it declares (timm's ``in_chans=1`` keeps the 3-channel ``input_size`` of its ``pretrained_cfg``).
    """
    first = _first_convolution(graph_module)
    return first[1].in_channels if first is not None and first[0] is node else None


def resolved_input_size(graph_module: fx.GraphModule, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """``input_size`` (C, H, W), or, where the graph's first convolution takes another number of channels and a
    probe of ``input_size`` fails at it, that number with the same height and width.

    A graph whose first convolution reads more than the image (coordinates concatenated to it) runs at
    ``input_size`` and keeps it; a probe failing anywhere else keeps it too (the analysis reports that failure).
    """
    first = _first_convolution(graph_module)
    if first is None or first[1].in_channels == input_size[0]:
        return input_size
    try:
        run_probe(graph_module, input_size)
    except ProbeFailed as failure:
        if failure.node is first[0]:
            return (first[1].in_channels, *input_size[1:])
    except Exception:  # a failure elsewhere is the analysis's to report, with its context
        return input_size
    return input_size
