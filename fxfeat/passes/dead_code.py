"""Pass: delete every node the outputs do not need.

Unlike ``fx.Graph.eliminate_dead_code``, side-effect-only checks (``torch._assert`` on a later stage's shape)
do not keep a pruned stage alive, but the model's checks on sizes of what is kept (a ViT's check of the input
size against its position embedding) stay; in-place writes are kept exactly when a kept node reads the tensor
they write (or a view of it) after them.
"""

from __future__ import annotations

import torch.fx as fx

from fxfeat.analyse.aliases import Aliases
from fxfeat.plan import ExtractionPlan
from fxfeat.trace.checks import is_kept_check

__all__ = ["remove_dead_code"]


def remove_dead_code(module: fx.GraphModule, plan: ExtractionPlan | None = None) -> int:
    """Erase every node that neither feeds the output nor writes into a tensor read later by one that does; returns
    how many were erased."""
    graph = module.graph
    aliases = Aliases(graph)
    live: set[fx.Node] = set()
    read_later: set[str] = set()  # storages (bases) a kept node reads after the current point
    for node in reversed(graph.nodes):
        keep = node.op in ("output", "placeholder") or node in live
        keep = keep or (aliases.is_write(node.name) and aliases.base(node.name) in read_later)
        if keep:
            live.add(node)
            for argument in node.all_input_nodes:
                live.add(argument)
                read_later.add(aliases.base(argument.name))
    for node in graph.nodes:
        if node not in live and is_kept_check(node, live):
            live |= _ancestors(node)
    dead = [node for node in reversed(list(graph.nodes)) if node not in live]
    for node in dead:
        graph.erase_node(node)
    return len(dead)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    found, pending = set(), [node]
    while pending:
        current = pending.pop()
        if current not in found:
            found.add(current)
            pending += current.all_input_nodes
    return found
