"""In-place writes: which nodes share a tensor's storage, which write into it, and which value each read sees.

``torch.fx`` records a write into a tensor or a slice of it (``out.add_(y)``, ``x[:, :c].add_(shortcut)``,
``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``) as a node nobody reads, and later code keeps reading
the original node. (``x += y`` on a proxy is recorded as an out-of-place add, and ``x[i] = y`` cannot be traced:
the submodule doing it is kept opaque.) Read naively, the graph says the later readers
see ``x`` as it was created; in fact they see it after the write. This module tracks, for every node, the node
that owns its storage (its *base*: views, and in-place ops, which return their input, share their input's
base), and every write into a base. A write is a new *version* of the base: a read after it depends on the
write, not on the node that was read.

The analysis works on ``torch.fx`` node kinds, not on a list of models: view-producing operations, methods whose
name ends in ``_``, augmented assignment operators, ``setitem``, functions called with ``inplace=True`` and
modules whose ``inplace`` attribute is true. :func:`annotate_aliases` records what needs the model or the probe
(modules' ``inplace`` flags, which indexing is a view) in ``node.meta``, so that a copy of the graph (the rewrite
passes work on one) can be analysed without them.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> class SliceResidual(nn.Module):
    ...     def forward(self, x):
    ...         out = x * 2
    ...         out[:, :1].add_(x[:, :1])
    ...         return out.sum()
    >>> graph = fx.symbolic_trace(SliceResidual()).graph
    >>> aliases = Aliases(graph)
    >>> aliases.base("getitem"), aliases.writes_to("mul")
    ('mul', ['add_'])
    >>> aliases.version_read("mul", by="sum_1")  # the sum reads `out` after the write
    'add_'
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import torch.fx as fx
from torch import nn

__all__ = ["Aliases", "annotate_aliases"]

_IN_PLACE_META = "fxfeat_in_place"  # node.meta key: a module call that writes into its first argument
_VIEW_META = "fxfeat_view"  # node.meta key: the node's result shares storage with its first argument

# Methods and functions whose result is a view of (shares storage with) their first argument.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "narrow", "select", "unsqueeze",
    "squeeze", "expand", "expand_as", "flatten", "unflatten", "contiguous", "chunk", "split", "split_with_sizes",
    "tensor_split", "unbind", "as_strided", "detach", "diagonal", "movedim", "moveaxis", "swapaxes", "swapdims",
    "unfold", "T", "mT", "real", "imag", "view_as_real",
}
_VIEW_FUNCTIONS = {
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.narrow, torch.select, torch.unsqueeze,
    torch.squeeze, torch.chunk, torch.split, torch.tensor_split, torch.unbind, torch.movedim, torch.swapaxes,
    torch.t, torch.detach, torch.diagonal, torch.unflatten,
}
_AUGMENTED_ASSIGNMENTS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
}
_NOT_WRITES = {"requires_grad_", "retain_grad_", "share_memory_"}  # end in "_" but leave the values alone


def annotate_aliases(graph: fx.Graph, root: nn.Module, tensor_nodes: set[str] | None) -> None:
    """Record in ``node.meta``, which copies of the graph keep, what takes the model or the probe to decide:
    which ``call_module`` nodes write in place (modules with ``inplace=True``), and which nodes are views
    (``tensor_nodes``, the names of the tensor-valued nodes, tells a slice from indexing with a tensor)."""
    for node in graph.nodes:
        if node.op == "call_module":
            try:
                module = root.get_submodule(node.target)
            except AttributeError:
                continue
            node.meta[_IN_PLACE_META] = getattr(module, "inplace", False) is True
        node.meta[_VIEW_META] = _is_view(node, tensor_nodes)


@functools.lru_cache(maxsize=512)
def _has_inplace_parameter(target) -> bool:
    try:
        return "inplace" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _inplace_argument(node: fx.Node) -> bool:
    """Whether a function call passes ``inplace=True`` (by keyword or by position)."""
    if "inplace" in node.kwargs:
        return node.kwargs["inplace"] is True
    if not _has_inplace_parameter(node.target):
        return False
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except TypeError:
        return False
    return bound.arguments.get("inplace") is True


def writes_first_argument(node: fx.Node) -> bool:
    """Whether ``node`` writes into (the storage of) its first argument."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("_") and node.target not in _NOT_WRITES
    if node.op == "call_function":
        if node.target is operator.setitem or node.target in _AUGMENTED_ASSIGNMENTS:
            return True
        name = getattr(node.target, "__name__", "")
        if name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
            return True
        return _inplace_argument(node)
    if node.op == "call_module":
        return bool(node.meta.get(_IN_PLACE_META))
    return False


def _is_view(node: fx.Node, tensor_nodes: set[str] | None) -> bool:
    """Whether ``node``'s result shares storage with its first argument.

    ``tensor_nodes`` (names of tensor-valued nodes, when known) tells a tensor's ``getitem`` (basic indexing: a
    view) from a tuple's (an element: a different tensor, unless the tuple comes from ``split``/``chunk``).
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op != "call_function":
        return False
    if node.target is not operator.getitem:
        return node.target in _VIEW_FUNCTIONS
    if tensor_nodes is not None and source.name not in tensor_nodes:  # an element of a tuple or list
        return (source.op == "call_method" and source.target in _VIEW_METHODS) or source.target in _VIEW_FUNCTIONS
    # Indexing with a tensor copies; a node in the index may be one (or an int computed from a shape).
    return not any(isinstance(item, fx.Node) and (tensor_nodes is None or item.name in tensor_nodes)
                   for item in _flatten(node.args[1]))


def _flatten(value) -> list:
    if isinstance(value, (list, tuple)):
        return [item for element in value for item in _flatten(element)]
    if isinstance(value, slice):
        return [value.start, value.stop, value.step]
    return [value]


class Aliases:
    """Bases, writes and versions of the tensors of one graph.

    Args:
        graph: an fx graph; ``call_module`` nodes are known to write in place only if :func:`annotate_aliases`
            marked them, and its view decisions are used where it made them.

    Attributes:
        order: position of every node name in the graph.
    """

    def __init__(self, graph: fx.Graph):
        self.order = {node.name: i for i, node in enumerate(graph.nodes)}
        self._base: dict[str, str] = {}
        self._writes: dict[str, list[str]] = {}  # base -> writing nodes, in graph order
        self._writers: set[str] = set()
        for node in graph.nodes:
            first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            writes = writes_first_argument(node)
            view = node.meta[_VIEW_META] if _VIEW_META in node.meta else _is_view(node, None)
            if first is not None and (writes or view):
                self._base[node.name] = self._base[first.name]
            else:
                self._base[node.name] = node.name
            if writes:
                self._writers.add(node.name)
                self._writes.setdefault(self._base[first.name], []).append(node.name)

    def base(self, name: str) -> str:
        """The node that created the storage ``name`` reads or writes."""
        return self._base.get(name, name)

    def writes_to(self, base: str) -> list[str]:
        """Nodes that write into the storage created by ``base``, in graph order."""
        return self._writes.get(self.base(base), [])

    def is_write(self, name: str) -> bool:
        return name in self._writers

    def version_read(self, name: str, by: str) -> str:
        """The node whose value a read of ``name`` by node ``by`` sees: the last write into ``name``'s storage
        between the two, or ``name`` itself."""
        return self._latest_write(name, self.order[by] - 1)

    def version_at_end_of(self, name: str, last: str) -> str:
        """The version of ``name``'s storage right after node ``last`` (a module call's last node)."""
        return self._latest_write(name, self.order[last])

    def _latest_write(self, name: str, until: int) -> str:
        """The last write into ``name``'s storage after ``name`` and at position ``until`` or before; or ``name``."""
        start = self.order[name]
        return next((write for write in reversed(self.writes_to(name)) if start < self.order[write] <= until), name)
