"""The isotropic body (rule 6 of :mod:`fxfeat.analyse.levels`): after the last stride change, one run of repeated
blocks that makes up the rest of the model at that reduction (a ViT's ``blocks``, torchvision's
``encoder.layers``, ConvMixer's), whose blocks are then every one a level.

A *run* is the repeated children of one module (each with a same-class sibling), each a block (traced through,
not one layer) lying wholly after the change and returning a map or token grid of the chain at the final
reduction. An isotropic body is one run of blocks, not a run of stages: a CNN whose stages all keep the
reduction of its stem (or of its last downsampling) has a run of stages, each holding blocks, one at least a run
of its own. Neither that run nor the runs of blocks inside its stages is a body; such a model gets the last map
at each reduction, as any CNN. Stages of one block each cannot be told from blocks wrapped in a container: they
are read as a body.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.conv = nn.Conv2d(8, 8, 3, padding=1)
    ...     def forward(self, x):
    ...         return x + self.conv(x)
    >>> class Isotropic(nn.Module):  # a patch embedding, then blocks: one level per block
    ...     def __init__(self, stages):
    ...         super().__init__()
    ...         self.embed = nn.Conv2d(3, 8, 4, 4)
    ...         self.stages = nn.Sequential(*(nn.Sequential(*(Block() for _ in range(depth))) for depth in stages))
    ...     def forward(self, x):
    ...         return self.stages(self.embed(x)).mean((2, 3))
    >>> [level.module for level in analyse(trace_model(Isotropic([1, 1, 1]).eval()), (3, 32, 32)).levels]
    ['stages.0', 'stages.1', 'stages.2']
    >>> [level.module for level in analyse(trace_model(Isotropic([1, 2]).eval()), (3, 32, 32)).levels]
    ['stages']
"""

from __future__ import annotations

from collections import defaultdict

from fxfeat.analyse.structure import Structure

__all__ = ["isotropic_body"]


def isotropic_body(structure: Structure, change: int, reduction: int) -> list[str]:
    """The isotropic body of the model, if it has one: the outputs of the blocks of one run (see the module
    docstring) whose module lies wholly after chain position ``change`` (the last stride change). The longest
    such run is the body if it has at least two members, holds most of the module outputs the chain computes after
    the change's stem (the calls holding the change that end before the run's module: a patch embedding), its
    module is not one stage among stages (:func:`_is_stage_among_stages`), and it is neither a run of stages nor
    inside a stage of one (:func:`_runs_of_stages`). Empty: no isotropic body."""
    runs = _runs(structure, change, reduction)
    staged = _runs_of_stages(structure, runs)
    best: list[str] = []
    for parent, members in runs.items():
        if not parent or structure.path_span(parent)[0] <= change or parent in staged:
            continue
        start = structure.path_span(parent)[0]
        stem_end = max((structure.span[key][1] for key in structure.stack(structure.chain[change])
                        if key in structure.span and structure.span[key][1] < start), default=change)
        outputs = [i for i in range(stem_end + 1, len(structure.chain))
                   if structure.is_candidate(structure.chain[i], reduction)]
        inside = sum(1 for i in outputs if any(structure.span[key][0] <= i <= structure.span[key][1]
                                               for key in members.values()))
        if (len(members) > len(best) and 2 * inside > len(outputs)
                and not _is_stage_among_stages(structure, parent, reduction)):
            best = list(members)
    return best


def _runs(structure: Structure, change: int, reduction: int) -> dict[str, dict[str, str]]:
    """Every run after chain position ``change`` with at least two members: parent path (``""``: the model) ->
    {output node: call}."""
    runs: dict[str, dict[str, str]] = defaultdict(dict)
    for i in range(change + 1, len(structure.chain)):
        name = structure.chain[i]
        if not structure.is_candidate(name, reduction):
            continue
        for key in structure.stack(name):
            first, last = structure.span[key]
            if last == i and first > change and structure.is_repeated(key) and _is_block(structure, key):
                runs[structure.traced.calls[key].path.rpartition(".")[0]].setdefault(name, key)
    return {parent: members for parent, members in runs.items() if len(members) >= 2}


def _runs_of_stages(structure: Structure, runs: dict[str, dict[str, str]]) -> set[str]:
    """The parents of the runs that are runs of stages (each member holds a block, one at least a run of them),
    and of the runs inside a member of one (the blocks of one stage among stages)."""
    calls = structure.traced.calls

    def inside(path: str, container: str) -> bool:
        return path == container or path.startswith(container + ".")

    staged: set[str] = set()
    for parent, members in runs.items():
        paths = [calls[key].path for key in members.values()]
        inner = [other for other in runs if other != parent and any(inside(other, path) for path in paths)]
        if inner and all(_holds_block(structure, key) for key in members.values()):
            staged |= {parent, *inner}
    return staged


def _holds_block(structure: Structure, key: str) -> bool:
    """Whether call ``key`` makes, on the chain, a call to a block holding a convolution or linear layer (it is a
    container of blocks, a stage, rather than a block of layers)."""
    first, last = structure.span[key]
    for name in structure.chain[first:last + 1]:
        stack = structure.stack(name)
        if key in stack and any(structure.holds_weights_layer(inner) for inner in stack[stack.index(key) + 1:]):
            return True
    return False


def _is_block(structure: Structure, key: str) -> bool:
    """Whether call ``key`` is a block (traced through, or a leaf made of submodules) rather than one layer."""
    call = structure.traced.calls[key]
    return not call.is_leaf or any(True for _ in structure.traced.root.get_submodule(call.path).children())


def _is_stage_among_stages(structure: Structure, path: str, reduction: int) -> bool:
    """Whether module ``path`` or one enclosing it has a same-class sibling whose last map on the chain, or any map
    on the chain inside it, is at a reduction other than ``reduction`` (DenseNet's last dense block, ConvNeXt's last
    stage, a stage after one that runs at another reduction and merges at its end)."""
    while path:
        parent_path, _, name = path.rpartition(".")
        parent = structure.traced.root.get_submodule(parent_path)
        kind = type(parent.get_submodule(name))
        for other, child in parent.named_children():
            span = structure.path_span(f"{parent_path}.{other}" if parent_path else other)
            if other == name or type(child) is not kind or span is None:
                continue
            inside = structure.chain[span[0]: span[1] + 1]
            if any(structure.is_map(node) and structure.reduction(node) != reduction for node in inside):
                return True
        path = parent_path
    return False
