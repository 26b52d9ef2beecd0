"""Pass: return each output as it was at its version, although a later in-place write changes the tensor.

A level read before an in-place write into the same tensor (the next block's ``relu_``, a slice ``add_``, the
``F.relu(features, inplace=True)`` after torchvision DenseNet's ``norm5``) must be returned as it was, not as it
is at the end of the graph. If something else needs the write, the output is a ``clone`` made right after its
version; if only this output's read kept the write alive, the write is dropped instead. Run after dead-code
removal, so that only writes the extractor still performs count; dead-code removal then drops what the copy made
unneeded.
"""

from __future__ import annotations

import torch.fx as fx

from fxfeat.analyse.aliases import Aliases
from fxfeat.plan import ExtractionPlan
from fxfeat.trace.metadata import output_node

__all__ = ["snapshot_outputs"]


def snapshot_outputs(module: fx.GraphModule, plan: ExtractionPlan) -> int:
    """Make each planned output independent of in-place writes after its version (see the module docstring);
    returns how many outputs needed it."""
    graph = module.graph
    aliases = Aliases(graph)
    nodes = {node.name: node for node in graph.nodes}
    returning = output_node(graph)
    returned = returning.args[0]
    values = list(returned.values()) if isinstance(returned, dict) else (
        list(returned) if isinstance(returned, (list, tuple)) else [returned])
    reads = [(nodes.get(output.node), nodes.get(output.version or output.node)) for output in plan.outputs]

    copies, unneeded = [], set()
    for index, (value, version) in enumerate(reads):
        if value is None or version is None:
            continue
        later = [write for write in aliases.writes_to(value.name) if aliases.order[write] > aliases.order[version.name]]
        if not later:
            continue
        others = [other for i, other in enumerate(reads) if i != index and other[0] is not None]
        if any(_needed(nodes[write], aliases, returning, others) for write in later):
            copies.append((index, value, version))
        else:
            unneeded.update(later)
    for write in sorted(unneeded, key=aliases.order.__getitem__, reverse=True):
        graph.erase_node(nodes[write])
    for index, value, version in copies:
        after = max(value, version, key=lambda node: aliases.order[node.name])
        with graph.inserting_after(after):
            copy = graph.call_method("clone", (value,))
        if values[index] is value:
            values[index] = copy
        else:  # the permute to NCHW made for this output
            values[index].replace_input_with(value, copy)
    if isinstance(returned, dict):
        returning.args = (dict(zip(returned, values)),)
    elif isinstance(returned, (list, tuple)):
        returning.args = (type(returned)(values),)
    else:
        returning.args = (values[0],)
    return len(copies) + len(unneeded)


def _needed(write: fx.Node, aliases: Aliases, returning: fx.Node, other_reads) -> bool:
    """Whether something other than the output being snapshotted sees ``write``: a user of its result, a later
    reader of the tensor it wrote, or another output read at a later version of that tensor."""
    if write.users:
        return True
    base, position = aliases.base(write.name), aliases.order[write.name]
    if any(aliases.base(value.name) == base and aliases.order[version.name] >= position
           for value, version in other_reads):
        return True
    return any(
        aliases.order.get(reader.name, -1) > position and reader is not returning
        and not (reader.op == "call_method" and reader.target == "permute" and returning in reader.users)
        for node in write.graph.nodes if aliases.base(node.name) == base
        for reader in node.users
    )
