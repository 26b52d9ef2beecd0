"""What the inference passes share: who reads a node's values, and how often each module is called."""

from __future__ import annotations

from collections import Counter

import torch.fx as fx

from fxfeat.trace.metadata import data_inputs

__all__ = ["call_counts", "value_readers"]

def value_readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values, not only its shape, dtype or device (``x.ndim`` checks, which a
    library's norm makes before normalising, stay true when the node is replaced by one of the same shape): the
    users it is a data input of (:func:`~fxfeat.trace.metadata.data_inputs`, the one table of metadata-only
    reads)."""
    return [user for user in node.users if node in data_inputs(user)]


def call_counts(graph: fx.Graph) -> Counter[str]:
    """How many ``call_module`` nodes call each module path (a layer called twice keeps its own weights)."""
    return Counter(node.target for node in graph.nodes if node.op == "call_module")
