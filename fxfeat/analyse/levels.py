"""Find the feature levels of a model: one node per spatial reduction, chosen by one structural rule.

The rule works on the *dominator chain* (nodes every input-to-output path passes through, in-place writes
included as new versions of the tensor they write), the reduction of each node on it, and the module calls
recorded by the tracer. A call is *repeated* when its module has a sibling of the same class (stages, blocks,
the layers of a VGG stage); plain containers (``nn.Sequential``...) count, as stages often are containers.

0. **A returned pyramid.** A model that returns maps at several reductions (a list, tuple or dict: a backbone, an
   encoder, an FPN) has those maps as its levels, in the order it returns them; the rest of the rule is for
   models that return one thing.
1. **Stride changes.** Walking the chain, a feature map whose reduction exceeds every earlier one changes the
   stride. A dilation that persists counts as the stride it replaced (:mod:`fxfeat.analyse.dilation`).
2. **Downsampling units.** The unit of a stride change is the outermost module call that contains it and no
   other change, and that is repeated, or, if it is not, holds no repeated call that ends before the change
   (a call holding such a thing is a container of stages, so the unit is inside it). ResNet's unit is
   ``layer2``, EfficientNet's ``blocks.2``, a flat ``features`` container's the strided block, DenseNet's the
   transition, a VGG stage's the max pooling, a stem's its strided convolution or pooling.
3. **Trunk.** The innermost call holding the units of the last change and of another one: the container of the
   stages (``blocks``, ``stages``, ``features``), or the model itself. A module the chain leaves for a run of
   blocks at the final reduction is a stem that holds every change, not the trunk: the trunk holds them too.
4. **Levels.** The level of a change's old reduction is the last feature map fed into its unit; it is a
   module's output. The stem (the call making the first change, unless it is the trunk) is one unit: a map
   inside it is not a level if the stem goes on to change the stride with a convolution (ViT-era stems that
   halve the resolution twice), but one the stem then max-pools is finished (ResNet's, DPN's).
5. **The deepest level** is the output of the trunk's last repeated call at the final reduction: a final
   layer the trunk holds once (ReXNet's 1x1 conv, DPN's closing norm) or a layer after the trunk (EfficientNet's
   ``conv_head``, a final norm) is head, not a level; DenseNet's ``norm5`` repeats ``norm0``, so it is one.

6. **An isotropic body** replaces all of that: when, after the last change, the repeated children of one module
   (a ViT's ``blocks``; blocks, not single layers) each return a map or token grid at the final reduction, hold
   most of the module outputs after the change's stem (the patch embedding), and are not one stage among stages
   (nor stages holding runs of blocks of their own), every block's output is a level
   (:mod:`fxfeat.analyse.body`).

7. **Branches that mix** (HRNet, NASNet) leave reductions off the chain: :mod:`fxfeat.analyse.branches` first
   inserts each reduction's last map there into the chain, and the rules above run on it.

A "map" here is a feature map or a token sequence on a grid of the input (:mod:`fxfeat.analyse.shapes`).
Levels are module outputs (``feature_info['module']`` names the outermost call returning the level that holds
no other level); ``nn.Identity`` calls and paddings are skipped; the input itself is never a level.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> analysis = analyse(trace_model(torchvision.models.resnet18().eval()), (3, 224, 224))
    >>> [(level.module, level.reduction) for level in analysis.levels]
    [('relu', 2), ('layer1', 4), ('layer2', 8), ('layer3', 16), ('layer4', 32)]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch.fx as fx

from fxfeat.analyse.body import isotropic_body
from fxfeat.analyse.dilation import dilated_changes
from fxfeat.analyse.shapes import NodeShape, TokenGrid
from fxfeat.analyse.structure import Structure, outermost_path, returned_versions, returning_calls
from fxfeat.trace import TracedModel
from fxfeat.trace.metadata import output_node

__all__ = [
    "Level", "LevelSearch", "StrideChange", "find_levels", "outermost_path", "returned_maps", "returned_versions",
    "returning_calls",
]


@dataclass(frozen=True)
class StrideChange:
    """A node of the dominator chain where the spatial reduction grows.

    Attributes:
        node: the first node at the new reduction.
        before: reduction before the change.
        after: reduction after it.
        unit: key of the module call that performs the change (``None``: a function in the root's forward).
    """

    node: str
    before: int
    after: int
    unit: str | None


@dataclass(frozen=True)
class Level:
    """One feature level: the node returned for it and what it is.

    Attributes:
        node: fx node name (for a tensor written in place, the write after which it is read).
        module: path of the module whose output the node is (``""`` if none).
        reduction: spatial reduction relative to the input.
        channels: number of channels.
        fmt: layout of the node as the model computes it (``"NCHW"``, ``"NHWC"``...).
        shape: per-sample shape at the probe size.
        candidates: every feature map of the chain at this reduction (what ``levels=[...]`` could pick).
        tensor: the node holding the level's tensor when that is not ``node`` itself (a write into a view of a
            tensor stands for the whole tensor); ``None`` otherwise.
        grid: for a token sequence, the grid its tokens lie on (prefix tokens, size, where to read it).
        key: the key the model returns the level under, when it returns its pyramid as a dict.
        module_output: ``module`` returns ``node`` itself; ``False`` when the node is element-wise functions
            computed from that module's output between module calls (``torch.relu(self.down(x))``).
    """

    node: str
    module: str
    reduction: int | None
    channels: int | None
    fmt: str | None
    shape: tuple[int, ...]
    candidates: tuple[str, ...] = ()
    tensor: str | None = None
    grid: TokenGrid | None = None
    key: str | None = None
    module_output: bool = True


@dataclass(frozen=True)
class LevelSearch:
    """What :func:`find_levels` found.

    Attributes:
        levels: the levels, in order of reduction.
        stride_changes: where the reduction grows along the dominator chain.
        trunk: path of the module holding the stages or blocks, called or not (an ``nn.ModuleList``); ``""``: the
            model itself.
        candidates: for each reduction, every feature map of the chain at it that a module returns.
        isotropic: the levels are the blocks of an isotropic body (rule 6).
    """

    levels: tuple[Level, ...]
    stride_changes: tuple[StrideChange, ...]
    trunk: str
    candidates: dict[int, tuple[str, ...]]
    isotropic: bool = False


def _stride_changes(structure: Structure) -> list[StrideChange]:
    """Rule 1 and 2: where the (dilation-aware) reduction grows along the chain, and each change's unit."""
    positions: list[tuple[int, int, int]] = []  # (position, before, after)
    running = 1
    for i, name in enumerate(structure.chain):
        if structure.is_map(name) and structure.reduction(name) > running:
            positions.append((i, running, structure.reduction(name)))
            running = structure.reduction(name)
    structure.change_positions = [p for p, _, _ in positions]
    return [StrideChange(structure.chain[p], before, after, structure.unit_of(p)) for p, before, after in positions]


def _trunk(structure: Structure, changes: list[StrideChange]) -> str:
    """Path of the innermost module, called or not, that holds the last change's unit and another change (rule 3):
    the container of the stages, or of the blocks when no stages group them (a flat ``nn.ModuleList`` the
    model's ``forward`` iterates); ``""``: the model. A module that the chain leaves for a run of blocks at the
    final reduction (:func:`_blocks_follow`) is a stem, not the trunk (a stem that downsamples, then stages that
    keep its reduction): the trunk holds them too."""
    if len(changes) < 2 or changes[-1].unit is None:
        return ""
    calls = structure.traced.calls
    path = calls[changes[-1].unit].path
    called = {call.path for call in calls.values()}
    units = {calls[change.unit].path for change in changes if change.unit}
    earlier = [structure.position[change.node] for change in changes[:-1]]
    while "." in path:
        path = path.rpartition(".")[0]
        span = structure.path_span(path)
        if span is None or not any(span[0] <= p <= span[1] for p in earlier):
            continue
        members = {call.path for call in calls.values() if call.path.rpartition(".")[0] == path}
        # A list of the downsampling layers alone (Twins' patch embeddings, beside its stages) is not the trunk:
        # it holds no block that keeps the size.
        if (path in called or members - units) and not _blocks_follow(structure, span[1], changes[-1].after):
            return path
    return ""


def _blocks_follow(structure: Structure, end: int, reduction: int) -> bool:
    """Whether, after chain position ``end``, a run of blocks holding convolutions or linear layers returns maps of
    the chain at ``reduction``: two calls or more of one module's same-class children, wholly after ``end`` (stages,
    or blocks; not a single head layer of the stem's class)."""
    runs: dict[str, set[str]] = defaultdict(set)  # parent path -> its children's calls
    for i in range(end + 1, len(structure.chain)):
        name = structure.chain[i]
        if not structure.is_map(name, reduction):
            continue
        for key in structure.stack(name):
            if (structure.span[key][0] > end and structure.span[key][1] == i and structure.is_repeated(key)
                    and structure.holds_weights_layer(key)):
                runs[structure.traced.calls[key].path.rpartition(".")[0]].add(key)
    return any(len(keys) >= 2 for keys in runs.values())


def returned_maps(traced: TracedModel, shapes: dict[str, NodeShape]) -> list[tuple[str, str | None]]:
    """The maps (and token grids) the model returns, in return order, each with the key of the dict that holds it
    (``None`` in a list or tuple); the input itself and empty placeholders (zero channels) are left out."""
    output = output_node(traced.graph)
    found: dict[str, str | None] = {}

    def visit(value: object, key: str | None) -> None:
        if isinstance(value, fx.Node):
            shape = shapes.get(value.name)
            if value.name not in traced.image_nodes and shape is not None and shape.is_spatial and 0 not in shape.shape:
                found.setdefault(value.name, key)
        elif isinstance(value, dict):
            for name, item in value.items():
                visit(item, str(name))
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item, key)

    visit(output.args[0] if output.args else None, None)
    return list(found.items())


def find_levels(
    traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape],
    versions: dict[str, list[str]] | None = None, write_tensors: dict[str, str] | None = None,
    head_begins_after: str | None = None,
) -> LevelSearch:
    """Discover the levels of a model (see the module docstring for the rule).

    Args:
        traced: the traced model.
        chain: its dominator chain.
        shapes: shape of every node; a write into a view of a tensor has the shape of the whole tensor.
        versions: calls whose returned tensor is last written by a write, by write (:func:`returned_versions`).
        write_tensors: for writes standing for another node's tensor, that node.
        head_begins_after: the node after which a fully-convolutional head begins (its classifier is a convolution
            applied to the map before the global pool): no level lies after it.
    """
    structure = Structure(traced, chain, shapes, versions or {}, write_tensors)
    changes = _stride_changes(structure)
    structure.trunk = _trunk(structure, changes)
    dilated = dilated_changes(structure)
    if dilated:  # stages that keep the resolution by dilating what a stride would have reduced
        factor = 1
        for i in range(len(chain)):
            factor *= dilated.get(i, 1)
            structure.dilation_factor[i] = factor
        changes = _stride_changes(structure)
        structure.trunk = _trunk(structure, changes)
    running = changes[-1].after if changes else 1
    if changes:
        trunk = structure.trunk
        structure.stem = next((key for key in structure.stack(changes[0].node) if key in structure.span and not (
            trunk == structure.traced.calls[key].path or trunk.startswith(structure.traced.calls[key].path + "."))),
                              None)

    levels: list[str] = []
    for change in changes:
        entry = structure.span[change.unit][0] if change.unit else structure.position[change.node]
        level = structure.last_candidate(range(entry - 1, -1, -1), change.before)
        if level is not None:
            levels.append(level)
    head_start = structure.head_start(running)
    if head_begins_after in structure.position:
        head_start = min(head_start, structure.position[head_begins_after] + 1)
    last = structure.last_candidate(range(head_start - 1, -1, -1), running)
    if last is None:  # no module returns a map at the final reduction before the head: take any after it
        last = next((chain[i] for i in range(len(chain) - 1, -1, -1)
                     if structure.is_map(chain[i], running) and structure.is_returned(chain[i])), None)
    if last is not None:  # the deepest map, carried on by element-wise functions up to the head
        last = structure.carried_on(last)
    if last is not None and last not in levels:
        levels.append(last)
    body = isotropic_body(structure, structure.change_positions[-1], running) if changes else []
    if body:  # an isotropic body: its blocks are the levels at the final reduction
        levels = body
    keys: dict[str, str | None] = {}
    returned = returned_maps(traced, shapes)
    if len({shapes[name].reduction for name, _ in returned}) > 1:  # the model returns its pyramid (rule 0)
        keys = dict(returned)
        levels, body = list(keys), []

    by_reduction: dict[int, list[str]] = defaultdict(list)
    for name in chain:
        if structure.is_map(name) and structure.is_returned(name):
            by_reduction[shapes[name].reduction].append(name)
    write_tensors = write_tensors or {}
    result = tuple(
        Level(
            node=name,
            module=structure.module_of(name, levels),
            reduction=shapes[name].reduction,
            channels=shapes[name].channels,
            fmt=shapes[name].fmt,
            shape=shapes[name].shape,
            candidates=tuple(by_reduction[shapes[name].reduction]),
            tensor=write_tensors.get(name),
            grid=shapes[name].grid,
            key=keys.get(name),
            module_output=structure.is_returned(name),
        )
        for name in levels
    )
    candidates = {reduction: tuple(names) for reduction, names in by_reduction.items()}
    return LevelSearch(result, tuple(changes), structure.trunk, candidates, isotropic=bool(body))
