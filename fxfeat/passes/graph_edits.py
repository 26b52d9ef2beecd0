"""What the inference passes share: who reads a node's values, and how often each module is called."""

from __future__ import annotations

from collections import Counter

import torch.fx as fx

__all__ = ["call_counts", "value_readers"]

_METADATA_ATTRIBUTES = {"ndim", "shape", "dtype", "device", "is_cuda"}
_METADATA_METHODS = {"dim", "size", "numel"}


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values, not only its shape, dtype or device (``x.ndim`` checks, which a
    library's norm makes before normalising, stay true when the node is replaced by one of the same shape)."""
    return [user for user in node.users if not (
        (user.op == "call_function" and user.target is getattr and user.args[1:2] and
         user.args[1] in _METADATA_ATTRIBUTES) or
        (user.op == "call_method" and user.target in _METADATA_METHODS))]


def call_counts(graph: fx.Graph) -> Counter[str]:
    """How many ``call_module`` nodes call each module path (a layer called twice keeps its own weights)."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")
