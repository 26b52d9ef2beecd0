"""Levels where the graph has no single chain: branches at several resolutions that mix (HRNet's parallel
resolutions, NASNet's and PNASNet's cells reading the two cells before them).

Between two consecutive maps of the dominator chain, ``a`` and ``b``, the model may compute maps at reductions the
chain skips (``b``'s reduction is more than twice ``a``'s): HRNet's chain goes from its first stage (reduction 4)
straight to the sum that closes its head (reduction 32); NASNet's from its stem convolution to its last cell. No
map between them lies on every path, so the chain alone gives no level there. The *region* is what the model
computes from ``a`` before ``b`` that reaches the output; the level of each reduction below ``b``'s is the
region's last map at it, in graph order, that counts:

- a module's output (not an ``nn.Identity``'s) at a block boundary: not made inside a call that also reads or
  holds maps at another reduction, unless that call returns it (the inside of a cell that downsamples, an HRNet
  stage's branches before their fusion);
- computed from maps at its own reduction (HRNet's ``incre_modules.1`` on the branch at reduction 8) rather than
  one that only carries a finer map down (its ``downsamp_modules.0``, a strided convolution from reduction 4, then
  its norm and activation, summed into that branch): such a map counts only where nothing else in the region is
  at its reduction (NASNet's first stem cell).

The picks (kept only while their reductions grow with their order) are inserted into the chain before ``b``,
where the usual rule (:mod:`fxfeat.analyse.levels`) finds their stride changes, units and names as on any chain.
Where ``b``'s reduction is at most twice ``a``'s, the chain's own rule holds: the maps inside a downsampling
block written without modules (BN-Inception's branches at the root) are no levels.

Example:
    >>> import torch.nn as nn
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> def block(stride=1):
    ...     return nn.Sequential(nn.Conv2d(8, 8, 3, stride, 1), nn.ReLU())
    >>> class TwoResolutions(nn.Module):  # branches at reductions 2 and 4, merged at 8
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.stem = nn.Conv2d(3, 8, 3, 2, 1)
    ...         self.fine, self.down, self.coarse = block(), block(2), block()
    ...         self.fine_to_8 = nn.Sequential(block(2), block(2))
    ...         self.coarse_to_8, self.last = block(2), block()
    ...     def forward(self, x):
    ...         x = self.stem(x)
    ...         fine, coarse = self.fine(x), self.coarse(self.down(x))
    ...         return self.last(self.fine_to_8(fine) + self.coarse_to_8(coarse))
    >>> analysis = analyse(trace_model(TwoResolutions().eval()), (3, 64, 64))
    >>> [(level.module, level.reduction) for level in analysis.levels]
    [('fine', 2), ('coarse', 4), ('last', 8)]
"""

from __future__ import annotations

from collections import defaultdict

from torch import nn

from fxfeat.analyse.dataflow import DataFlow
from fxfeat.analyse.shapes import NodeShape
from fxfeat.analyse.structure import returning_calls
from fxfeat.trace import TracedModel

__all__ = ["bridge_branches"]


def bridge_branches(traced: TracedModel, dataflow: DataFlow, chain: tuple[str, ...], shapes: dict[str, NodeShape],
                    versions: dict[str, list[str]]) -> tuple[str, ...]:
    """``chain`` with, between consecutive maps whose reductions skip one, the last map of each reduction the
    region between them computes (see the module docstring)."""

    def reduction(name: str) -> int | None:
        shape = shapes.get(name)
        return shape.reduction if shape is not None and shape.is_spatial else None

    maps = [(i, name) for i, name in enumerate(chain) if reduction(name) is not None]
    inserted: dict[int, list[str]] = {}
    for (_, start), (j, end) in zip(maps, maps[1:]):
        if reduction(end) <= 2 * reduction(start):  # no reduction skipped: the chain's own rule holds
            continue
        region = {name for name in dataflow.computed_from(start)
                  if dataflow.feeds_output(name) and dataflow.order[name] < dataflow.order[end]}
        picks = _last_maps(traced, region, reduction, versions, dataflow.order, below=reduction(end))
        if any(reduction(pick) > reduction(start) for pick in picks):
            inserted[j] = picks
    if not inserted:
        return chain
    bridged: list[str] = []
    for i, name in enumerate(chain):
        bridged += [pick for pick in inserted.get(i, ()) if pick not in bridged]
        bridged.append(name)
    return tuple(bridged)


def _last_maps(traced: TracedModel, region: set[str], reduction, versions: dict[str, list[str]],
               order: dict[str, int], below: int) -> list[str]:
    """For each reduction below ``below`` in ``region``, its last map at a block boundary, in graph order; only
    picks whose reductions grow with their order are kept."""
    reductions: dict[str, set[int]] = defaultdict(set)  # call -> the reductions of the maps it reads or computes
    for key, call in traced.calls.items():
        reductions[key].update(r for r in map(reduction, call.inputs) if r is not None)
    for name, stack in traced.node_calls.items():
        r = reduction(name)
        if r is not None:
            for key in stack:
                reductions[key].add(r)

    def returned_by(name: str) -> list[str]:
        node = traced.nodes[name]
        if node.op == "placeholder" or node.op == "call_module" and isinstance(
                traced.root.get_submodule(node.target), nn.Identity):
            return []
        return returning_calls(traced, name, versions)

    def inside_resolution_change(name: str, returning: list[str]) -> bool:  # not at a block boundary
        return any(reductions[key] != {reduction(name)}
                   for key in traced.node_calls.get(name, ()) if key not in returning)

    def carries_finer_map(name: str) -> bool:
        """Whether ``name`` only brings a finer map down to its reduction: going back through the nodes with one
        map operand, all at its reduction, the first that reads several maps or none is one reading a finer map
        (a strided convolution, then its norm and activation)."""
        r = reduction(name)
        while True:
            operands = [reduction(node.name) for node in traced.nodes[name].all_input_nodes]
            operands = [o for o in operands if o is not None]
            if any(o < r for o in operands):
                return True
            if len(operands) != 1:
                return False
            name = next(node.name for node in traced.nodes[name].all_input_nodes if reduction(node.name) is not None)

    found: dict[int, tuple[str | None, str | None]] = {}  # reduction -> (last map, last downsampling output)
    for name in sorted(region, key=order.__getitem__):
        r = reduction(name)
        if r is None or r >= below:
            continue
        returning = returned_by(name)
        if not returning or inside_resolution_change(name, returning):
            continue
        kept, carried = found.get(r, (None, None))
        found[r] = (kept, name) if carries_finer_map(name) else (name, carried)
    picks = sorted((kept or carried for kept, carried in found.values()), key=order.__getitem__)
    increasing: list[str] = []
    for pick in picks:
        if not increasing or reduction(pick) > reduction(increasing[-1]):
            increasing.append(pick)
    return increasing
