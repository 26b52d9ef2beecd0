"""Inference pass (CPU): run each convolution or linear layer and the activation after it as one oneDNN call.

On the CPU, PyTorch runs convolutions and linear layers with oneDNN, which can apply an activation to each
output while it is still in cache (a *post-op*): ``gelu(linear(x))`` as one call instead of a matrix product,
a pass that copies the bias into the output, and a pass over the whole output for the activation. The pass
rewrites a plain ``nn.Conv2d`` (numeric padding, zeros padding mode) or ``nn.Linear`` call whose only reader is
an activation oneDNN applies (ReLU, ReLU6/Hardtanh, LeakyReLU, SiLU, GELU, Hardswish, Hardsigmoid, Sigmoid,
Tanh; module, function or method, in place or not) into :func:`conv2d_activation` or
:func:`linear_activation`. Those call PyTorch's oneDNN operators for float32 tensors on the CPU and the plain
ops everywhere else, so a module moved to another device still computes the same thing.

The pass is for float32 inference on the CPU; ``optimize_for_inference`` runs it there only.

Example:
    >>> import torch, torchvision, fxfeat
    >>> from fxfeat.optimize import inference_copy
    >>> extractor = fxfeat.compile(torchvision.models.resnet18(), out_indices=(0,)).eval()
    >>> module = inference_copy(extractor)
    >>> fuse_activations(module)   # the stem's conv (its batch norm is not folded here: fused with nothing)
    0
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxfeat.passes.fold_batch_norm import value_readers

__all__ = ["FUSED_CONV_MIN_POSITIONS", "conv2d_activation", "fuse_activations", "linear_activation", "onednn_available"]

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
}


def onednn_available() -> bool:
    """Whether this PyTorch build has the oneDNN operators the pass calls."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise") \
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _on_onednn(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()


# oneDNN's fused convolution costs some 30-50 us per call more than PyTorch's (it prepares the weights each
# time): below this many output positions per map (28 x 28) that costs more than the fusion saves (measured on a
# 2-core Xeon: a 1x1 convolution on a 7x7 map runs 180 us in PyTorch, 300 us fused; a depthwise 3x3 on 56x56,
# 260 us and 215 us). The decision is made at run time, from the input's size.
FUSED_CONV_MIN_POSITIONS = 28 * 28


@fx.wrap
def conv2d_activation(x, weight, bias, stride, padding, dilation, groups, activation, scalars, algorithm):
    """``activation(F.conv2d(x, weight, bias, stride, padding, dilation, groups))``; one oneDNN call for float32
    inference on the CPU on channels-last maps large enough (``FUSED_CONV_MIN_POSITIONS``). (oneDNN returns
    channels-last maps whatever the input's layout, and gains nothing on NCHW ones.)"""
    if _on_onednn(x) and x.is_contiguous(memory_format=torch.channels_last) \
            and (x.shape[-2] // stride[0]) * (x.shape[-1] // stride[1]) >= FUSED_CONV_MIN_POSITIONS:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                      activation, scalars, algorithm)
    return _ACTIVATIONS[activation](F.conv2d(x, weight, bias, stride, padding, dilation, groups), scalars, algorithm)


@fx.wrap
def linear_activation(x, weight, bias, activation, scalars, algorithm):
    """``activation(F.linear(x, weight, bias))``; one oneDNN call for float32 inference on the CPU."""
    if _on_onednn(x) and x.dim() >= 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, activation, scalars, algorithm)
    return _ACTIVATIONS[activation](F.linear(x, weight, bias), scalars, algorithm)


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


def _layer(module: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The plain ``nn.Conv2d`` or ``nn.Linear`` ``node`` calls on one tensor, if it is one oneDNN can run."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs or len(value_readers(node)) != 1:
        return None
    layer = module.get_submodule(node.target)
    if type(layer) is nn.Linear:
        return layer
    if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return layer
    return None


def fuse_activations(module: fx.GraphModule) -> int:
    """Fuse every convolution/linear layer + activation pair of ``module``'s graph (changed in place) into one
    call; returns how many pairs were fused."""
    fused = 0
    for node in list(module.graph.nodes):
        layer = _layer(module, node)
        if layer is None:
            continue
        activation_node = value_readers(node)[0]
        if activation_node.args[0] is not node:
            continue
        activation = _activation(module, activation_node)
        if activation is None:
            continue
        with module.graph.inserting_before(node.next):  # before the shape checks reading the layer's output
            weight = module.graph.get_attr(node.target + ".weight")
            bias = module.graph.get_attr(node.target + ".bias") if layer.bias is not None else None
            if isinstance(layer, nn.Linear):
                call = module.graph.call_function(linear_activation, (node.args[0], weight, bias, *activation))
            else:
                call = module.graph.call_function(conv2d_activation, (
                    node.args[0], weight, bias, list(layer.stride), list(layer.padding), list(layer.dilation),
                    layer.groups, *activation))
        activation_node.replace_all_uses_with(call)
        module.graph.erase_node(activation_node)
        node.replace_all_uses_with(call)  # the shape checks: the same shape
        module.graph.erase_node(node)
        fused += 1
    if fused:
        module.graph.lint()
        module.recompile()
    return fused
