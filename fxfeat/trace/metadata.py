"""Which inputs of a node carry data, and which only metadata (shapes, dtypes, devices).

Data flow, for the analyses and for shape-aware tracing, is what flows into a node's *values*. Uses that read only
a tensor's metadata (``x.shape``, ``x.size()``, ``torch.zeros_like(x)``...) do not count, and neither do values
the shape probe found no tensor in (a size a leaf function returns beside a tensor).

Example:
    >>> import torch, torch.fx as fx
    >>> graph = fx.symbolic_trace(lambda x: x.new_zeros(x.shape[0]) + x.sum()).graph
    >>> {node.name: [arg.name for arg in data_inputs(node)] for node in graph.nodes if node.op != "output"}
    {'x': [], 'getattr_1': [], 'getitem': ['getattr_1'], 'new_zeros': [], 'sum_1': ['x'], 'add': ['new_zeros', 'sum_1']}
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["NO_TENSOR", "data_inputs", "is_size_arithmetic", "output_node"]

NO_TENSOR = "fxfeat_no_tensor"  # node.meta key: the shape probe found no tensor in the node's value

_METADATA_ATTRIBUTES = {
    "shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse", "is_quantized",
    "is_meta", "names",
}
_METADATA_METHODS = {
    "size", "dim", "ndimension", "numel", "nelement", "element_size", "get_device", "is_contiguous",
    "is_floating_point", "is_complex", "new_zeros", "new_ones", "new_empty", "new_full",
}
# Methods whose *other* tensor argument only lends its shape or dtype.
_SHAPE_DONOR_METHODS = {"expand_as", "view_as", "reshape_as", "type_as"}
_METADATA_FUNCTIONS = {
    len, torch.numel, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
    torch.rand_like, torch.randn_like, torch.randint_like,
}


def data_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` whose values (not only metadata) flow into its result."""
    if node.op in ("placeholder", "get_attr"):
        return []
    if node.op == "call_function":
        if node.target is getattr and len(node.args) > 1 and node.args[1] in _METADATA_ATTRIBUTES:
            return []
        if node.target in _METADATA_FUNCTIONS:
            return []
    if node.op == "call_method":
        if node.target in _METADATA_METHODS:
            return []
        if node.target in _SHAPE_DONOR_METHODS:
            return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return [arg for arg in node.all_input_nodes if not arg.meta.get(NO_TENSOR)]


_SIZE_METHODS = {"size", "dim", "ndimension", "numel", "nelement"}
_ARITHMETIC = {getattr(operator, name) for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge",
    "and_", "or_", "not_", "truth")}


def is_size_arithmetic(node: fx.Node) -> bool:
    """Whether ``node`` computes only with sizes: a tensor's ``shape`` (or ``size()``, ``dim()``...), items of it,
    ``len`` of it, and arithmetic or comparisons on those and constants."""
    if node.op == "call_method":
        return node.target in _SIZE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] == "shape"
    if node.target is len or node.target in _ARITHMETIC:
        return all(is_size_arithmetic(arg) for arg in node.all_input_nodes)
    return False


def output_node(graph: fx.Graph) -> fx.Node:
    """The graph's ``output`` node (the last one)."""
    return next(node for node in reversed(graph.nodes) if node.op == "output")
