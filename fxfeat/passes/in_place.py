"""Inference pass: compute activations and residual sums in place where nothing reads the overwritten value.

A model traced by torch.fx often computes out of place what its eager code did in place (``x = x + shortcut``
where the eager model wrote ``x += shortcut``; ``F.gelu(x)``; activations built with ``inplace=False``), so the
graph allocates a new tensor where it could reuse one. The pass rewrites

- an activation (``nn.ReLU``-style modules of ``torch.nn``, ``F.relu``-style functions with an ``inplace``
  argument, ``torch.relu``/``sigmoid``/``tanh`` and their methods) into its in-place form;
- a sum or product of two tensors (``a + b``, ``torch.add``, ``a.add(b)``; ``a * b``...) into
  :func:`add_in_place` / :func:`mul_in_place`, which write into ``a`` when the result has ``a``'s shape, dtype and
  device (checked at run time, so autocast or broadcasting can never change the result) and compute out of
  place otherwise (residual sums, layer scales);

only where the data flow proves the overwrite safe (:mod:`fxfeat.analyse.aliases`): the overwritten tensor was
created by an operation known to return a new tensor (not a parameter, the input, or a value a library function
might return unchanged), and no node other than the rewritten one reads it, or any view of it, afterwards. A value
read twice is never overwritten before its last read.

The pass reads the tensors' shapes that ``torch.fx``'s ``ShapeProp`` records (a node without one is left alone).

Example:
    >>> import torch, timm, fxfeat
    >>> from torch.fx.passes.shape_prop import ShapeProp
    >>> from fxfeat.optimize import inference_copy
    >>> from fxfeat.passes.remove_no_ops import remove_no_ops
    >>> module = inference_copy(fxfeat.compile(timm.create_model("convnext_atto"), out_indices=(0,)))
    >>> _ = ShapeProp(module).propagate(torch.randn(1, 3, 64, 64))
    >>> remove_no_ops(module)      # drop paths and shortcuts: nn.Identity
    11
    >>> restore_in_place(module)   # the two blocks' layer scales and residual sums
    4
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from fxfeat.analyse.aliases import Aliases, annotate_aliases
from fxfeat.passes.graph_edits import call_counts
from fxfeat.runtime.in_place import add_in_place, mul_in_place

__all__ = ["Overwrites", "is_tensor", "restore_in_place"]


# torch.nn modules whose output is always a new tensor: layers, norms, poolings, activations (out of place).
_FRESH_MODULE_FILES = {
    "torch.nn.modules.conv", "torch.nn.modules.linear", "torch.nn.modules.batchnorm", "torch.nn.modules.normalization",
    "torch.nn.modules.instancenorm", "torch.nn.modules.pooling", "torch.nn.modules.activation",
    "torch.nn.modules.upsampling", "torch.nn.modules.pixelshuffle",
}
_FRESH_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.matmul,
    torch.add, torch.sub, torch.mul, torch.div, torch.cat, torch.matmul, torch.bmm, torch.sigmoid, torch.tanh,
    torch.relu, torch.softmax, add_in_place, mul_in_place,
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.mish, F.leaky_relu, F.elu,
    F.layer_norm, F.batch_norm, F.group_norm, F.instance_norm, F.conv1d, F.conv2d, F.conv3d, F.linear,
    F.avg_pool2d, F.max_pool2d, F.adaptive_avg_pool2d, F.interpolate, F.softmax, F.scaled_dot_product_attention,
}
_FRESH_METHODS = {"add", "sub", "mul", "div", "matmul", "sigmoid", "tanh", "relu", "softmax", "mean", "sum", "exp",
                  "pow", "clamp"}

# Out-of-place activations and their in-place twins.
_IN_PLACE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.LeakyReLU, nn.ELU,
                     nn.CELU, nn.SELU, nn.Hardtanh)
_IN_PLACE_FUNCTIONS = {F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.leaky_relu, F.elu, F.celu,
                       F.selu, F.hardtanh}
_IN_PLACE_TWINS = {torch.relu: torch.relu_, torch.sigmoid: torch.sigmoid_, torch.tanh: torch.tanh_}
_IN_PLACE_METHODS = {"relu", "sigmoid", "tanh"}
# Element-wise products and sums of two tensors, and the function computing each into its first operand.
_BINARY_FUNCTIONS = {operator.add: add_in_place, torch.add: add_in_place, operator.mul: mul_in_place,
                     torch.mul: mul_in_place}
_BINARY_METHODS = {"add": add_in_place, "mul": mul_in_place}


def _fresh(node: fx.Node, module: fx.GraphModule) -> bool:
    """Whether ``node`` certainly returns a new tensor (so overwriting it touches nothing else)."""
    if node.op == "call_module":
        layer = module.get_submodule(node.target)
        return type(layer).__module__ in _FRESH_MODULE_FILES and not isinstance(layer, nn.Identity)
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    return node.op == "call_method" and node.target in _FRESH_METHODS


class Overwrites:
    """Who reads each storage, to decide whether a node may overwrite one of its inputs (the graph's aliases must
    be annotated: :func:`fxfeat.analyse.aliases.annotate_aliases`)."""

    def __init__(self, module: fx.GraphModule):
        self.module = module
        self.aliases = Aliases(module.graph)
        self.nodes = {node.name: node for node in module.graph.nodes}
        self.readers: dict[str, list[fx.Node]] = {}
        for node in module.graph.nodes:
            for reader in node.users:
                self.readers.setdefault(self.aliases.base(node.name), []).append(reader)

    def may_overwrite(self, node: fx.Node, value: object) -> bool:
        """Whether ``node`` may write into ``value``: a new tensor that nothing but ``node`` reads afterwards."""
        if not isinstance(value, fx.Node) or not is_tensor(value):
            return False
        base = self.aliases.base(value.name)
        if not _fresh(self.nodes[base], self.module):
            return False
        position = self.aliases.order[node.name]
        if any(self.aliases.base(other.name) == base for other in node.all_input_nodes if other is not value):
            return False  # `x + x[...]`: the other operand shares the storage
        return all(reader is node or self.aliases.order[reader.name] < position
                   for reader in self.readers.get(base, ()))


def restore_in_place(module: fx.GraphModule) -> int:
    """Rewrite the activations and sums of ``module``'s graph that may run in place (see the module docstring);
    ``module`` is changed in place. Returns how many nodes were rewritten."""
    annotate_aliases(module.graph, module, tensor_nodes=None)
    readers = Overwrites(module)
    rewritten = 0
    safe_calls: dict[str, bool] = {}
    for node in module.graph.nodes:
        if not node.args:
            continue
        first = node.args[0]
        if node.op == "call_module" and type(module.get_submodule(node.target)) in _IN_PLACE_MODULES:
            if not module.get_submodule(node.target).inplace:
                ok = readers.may_overwrite(node, first) and len(node.args) == 1 and not node.kwargs
                safe_calls[node.target] = safe_calls.get(node.target, True) and ok
        elif node.op == "call_function" and node.target in _IN_PLACE_FUNCTIONS:
            if not node.kwargs.get("inplace") and len(node.args) == 1 and readers.may_overwrite(node, first):
                node.kwargs = {**node.kwargs, "inplace": True}
                rewritten += 1
        elif node.op == "call_function" and node.target in _IN_PLACE_TWINS:
            if len(node.args) == 1 and not node.kwargs and readers.may_overwrite(node, first):
                node.target = _IN_PLACE_TWINS[node.target]
                rewritten += 1
        elif node.op == "call_method" and node.target in _IN_PLACE_METHODS:
            if len(node.args) == 1 and not node.kwargs and readers.may_overwrite(node, first):
                node.target = node.target + "_"
                rewritten += 1
        elif _in_place_twin(node) is not None:
            for a, b in (node.args, node.args[::-1]):
                if readers.may_overwrite(node, a):
                    node.target, node.op, node.args = _in_place_twin(node), "call_function", (a, b)
                    rewritten += 1
                    break
    calls = call_counts(module.graph)
    for target, ok in safe_calls.items():
        if ok:
            module.get_submodule(target).inplace = True
            rewritten += calls[target]
    return rewritten


def is_tensor(node: fx.Node) -> bool:
    """Whether ``node`` computed a tensor when ``torch.fx``'s ``ShapeProp`` ran the graph (unknown: no)."""
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _in_place_twin(node: fx.Node):
    """For ``a + b`` or ``a * b`` of two tensors (no ``alpha``, no ``out``): the function computing it into its
    first operand; else ``None``."""
    if len(node.args) != 2 or node.kwargs or not all(isinstance(arg, fx.Node) and is_tensor(arg) for arg in node.args):
        return None
    if node.op == "call_function":
        return _BINARY_FUNCTIONS.get(node.target)
    return _BINARY_METHODS.get(node.target) if node.op == "call_method" else None

