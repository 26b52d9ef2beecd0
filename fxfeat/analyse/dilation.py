"""Dilated stride changes: stages that keep the resolution by dilating what a stride would have reduced.

torchvision's ``replace_stride_with_dilation`` and timm's ``output_stride`` remove a stage's stride and dilate
every spatial convolution from there on instead. The level rule counts such a stage as a change of reduction, as
the undilated model's stride would have been (:mod:`fxfeat.analyse.levels`, rule 1). What marks it is that the
dilation *persists*: a spatial convolution of the trunk whose dilation exceeds every one before it, and that no
spatial convolution of the trunk computed after it or beside it goes below. A convolution beside it is one it
does not read (its value does not flow into it): the parallel path of the same block. So a selective-kernel
block's dilated branch, which an undilated branch of the same block runs beside (timm's SKNet: dilations 1 and 2
on one input), is no dilated stage, even in the last block of the model, where no convolution follows it; nor is
an ASPP head, whose dilated branches a plain convolution follows.

Example:
    >>> from torch import nn
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> class SelectiveKernel(nn.Module):  # a 3x3 convolution and a dilated one beside it, summed
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.plain = nn.Conv2d(8, 8, 3, padding=1)
    ...         self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
    ...     def forward(self, x):
    ...         return self.plain(x) + self.dilated(x)
    >>> def net(last):
    ...     return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU(), last)
    >>> def levels(model):
    ...     return [(level.module, level.reduction) for level in analyse(trace_model(model.eval()), (3, 32, 32)).levels]
    >>> levels(net(SelectiveKernel()))  # a branch: one level at reduction 4
    [('1', 2), ('3', 4)]
    >>> levels(net(nn.Conv2d(8, 8, 3, padding=2, dilation=2)))  # a stage whose stride became a dilation
    [('1', 2), ('3', 4), ('4', 4)]
"""

from __future__ import annotations

from torch import nn

from fxfeat.analyse.aliases import Aliases
from fxfeat.analyse.structure import Structure

__all__ = ["dilated_changes"]


def dilated_changes(structure: Structure) -> dict[int, int]:
    """Dilated stride changes, by chain position (the first map of the chain from the convolution on: its output,
    or the sum of the block it lies in), with their factor: the dilation's growth over the one before it (see the
    module docstring)."""
    trunk, traced = structure.trunk, structure.traced
    convolutions = []  # (node name, graph position, dilation) of the trunk's spatial convolutions
    for node in traced.graph.nodes:
        if node.op != "call_module" or trunk and not node.target.startswith(trunk + "."):
            continue
        layer = traced.root.get_submodule(node.target)
        if isinstance(layer, nn.modules.conv._ConvNd) and max(layer.kernel_size) > 1:
            convolutions.append((node.name, structure.order[node.name], max(layer.dilation)))
    dilated: dict[int, int] = {}
    running = 1
    reads: _Reads | None = None
    for name, order, dilation in convolutions:
        if dilation <= running:
            continue
        reads = reads or _Reads(structure)
        read = reads.computed_before(name)
        if any(other < dilation for other_name, _, other in convolutions if other_name not in read):
            continue  # a later convolution, or one beside it, goes below: the dilation does not persist
        after = next((i for i, chained in enumerate(structure.chain)
                      if structure.order[chained] >= order and structure.is_map(chained)), None)
        if after is not None:
            dilated[after] = dilated.get(after, 1) * dilation // running
        running = dilation
    return dilated


class _Reads:
    """What a node's value is computed from, following in-place writes (a read after a write reads the write)."""

    def __init__(self, structure: Structure):
        self.nodes = structure.traced.nodes
        self.aliases = Aliases(structure.traced.graph)

    def computed_before(self, name: str) -> set[str]:
        """``name`` and every node whose value flows into it."""
        found, pending = {name}, [name]
        while pending:
            node = self.nodes[pending.pop()]
            for argument in node.all_input_nodes:
                for source in (argument.name, self.aliases.version_read(argument.name, by=node.name)):
                    if source not in found:
                        found.add(source)
                        pending.append(source)
        return found
