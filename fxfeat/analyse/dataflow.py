"""The data-flow graph of a traced model (networkx) and the nodes every input-to-output path goes through.

Only data flow counts, and it follows in-place writes: a read after a write depends on the write. Parameters
and constants (``get_attr`` nodes and what is computed from them alone, such as a layer-scale
``gamma.reshape(...)`` or a position embedding) are not data flow, and neither are uses that
read only a tensor's metadata (``x.shape``, ``x.size()``, ``torch.zeros_like(x)``...), values the shape probe
found no tensor in (sizes a leaf function returns beside a tensor), nor tensors built from such metadata
(``torch.zeros(x.shape[0], ...)``). Wiring those to the input would create paths that bypass
the real computation and break dominance for everything before them.

This module is the only one that speaks networkx; the rest of fxfeat works with node names.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse.dataflow import DataFlow
    >>> flow = DataFlow(trace_model(torchvision.models.resnet18().eval()).graph)
    >>> flow.dominator_chain()[:4]
    ('x', 'conv1', 'bn1', 'relu')
"""

from __future__ import annotations

import functools

import networkx as nx
import torch.fx as fx

from fxfeat.analyse.aliases import Aliases
from fxfeat.trace.metadata import data_inputs

__all__ = ["DataFlow"]

class DataFlow:
    """Data-flow graph of an fx graph: an edge ``u -> v`` when ``u``'s value flows into ``v``.

    In-place writes are versions (see :mod:`fxfeat.analyse.aliases`): a node that reads a tensor after something
    wrote into it (``out.add_(y)``, ``x[:, :c].add_(s)``, an in-place activation) gets its edge from the last
    write, not from the node that created the tensor.

    Args:
        graph: the traced graph; its first placeholder is the image input.
        aliases: storage sharing and in-place writes of ``graph`` (default: computed without tensor types).
    """

    def __init__(self, graph: fx.Graph, aliases: Aliases | None = None):
        nodes = list(graph.nodes)
        self._fx_nodes = nodes
        self.aliases = aliases or Aliases(graph)
        self.order = self.aliases.order
        self.source = next(node.name for node in nodes if node.op == "placeholder")
        self.sink = next(node.name for node in reversed(nodes) if node.op == "output")
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(node.name for node in nodes)
        self.graph.add_edges_from(
            (self.aliases.version_read(arg.name, by=node.name), node.name)
            for node in nodes for arg in data_inputs(node)
        )
        self.data_nodes = nx.descendants(self.graph, self.source) | {self.source}

    def depends_on_input(self, name: str) -> bool:
        """Whether the value of node ``name`` is computed from the input image."""
        return name in self.data_nodes

    def dominator_chain(self, sink: str | None = None) -> tuple[str, ...]:
        """Nodes that every path from the input to ``sink`` (default: the output) passes through, in order."""
        sink = sink or self.sink
        if sink not in self.data_nodes:
            return ()
        on_paths = self.data_nodes & (nx.ancestors(self.graph, sink) | {sink})
        dominators = nx.immediate_dominators(self.graph.subgraph(on_paths), self.source)
        chain = [sink]
        while chain[-1] != self.source:
            chain.append(dominators[chain[-1]])
        return tuple(reversed(chain))

    def computed_from(self, name: str) -> set[str]:
        """The nodes whose value is computed from node ``name``'s (its data-flow descendants)."""
        return nx.descendants(self.graph, name)

    def feeds_output(self, name: str) -> bool:
        """Whether the value of node ``name`` reaches the output."""
        return name in self._output_ancestors

    @functools.cached_property
    def _output_ancestors(self) -> set[str]:
        return nx.ancestors(self.graph, self.sink) | {self.sink}

    def ancestors(self, names: list[str]) -> set[str]:
        """Every node (data or not) some of ``names`` is computed from, themselves included."""
        found = set(names)
        for name in names:
            found |= nx.ancestors(self.graph_with_all_inputs, name)
        return found

    @functools.cached_property
    def graph_with_all_inputs(self) -> nx.DiGraph:
        """Dependency graph including parameter and metadata edges."""
        graph = nx.DiGraph()
        graph.add_nodes_from(self.graph.nodes)
        for node in self._fx_nodes:
            for arg in node.all_input_nodes:
                graph.add_edge(arg.name, node.name)
                graph.add_edge(self.aliases.version_read(arg.name, by=node.name), node.name)
        return graph
