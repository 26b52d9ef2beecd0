"""Find the feature levels of a model: one node per spatial reduction, chosen by one structural rule.

The rule works on the *dominator chain* (nodes every input-to-output path passes through), the reduction of
each node on it, and the module calls recorded by the tracer:

1. **Stride changes.** Walking the chain, a node whose reduction exceeds every earlier one changes the stride.
2. **Downsampling units.** The unit of a stride change is the outermost module call that contains it, contains
   no other stride change, and holds no earlier *stage-like* output before it: a block boundary returned by
   a module with a same-class sibling (``blocks.0``/``blocks.1``, the two ``ReLU`` of a VGG stage; plain
   containers such as ``nn.Sequential`` subclasses do not count). So ResNet's unit is
   ``layer2``, EfficientNet's is ``blocks.2`` (its 1x1 expansion conv runs at the old resolution but in the
   middle of a block), DenseNet's is ``transition1`` (its channel-halving conv belongs to the transition),
   and a VGG stage's is the max-pool itself.
3. **Levels.** The level of the old reduction is the last feature map fed into the unit.
4. **Trunk.** The trunk is the innermost module call holding the units of all stride changes but the first
   (the stem's). The deepest level is the last feature map the trunk produces, so a 1x1 head conv outside
   the container of the stages (EfficientNet's ``conv_head``) is not a level, while one inside it
   (DenseNet's ``norm5``, MobileNetV3's last 960-channel conv) is.

Levels are module outputs (``feature_info['module']`` names the outermost such module inside the trunk);
``nn.Identity`` calls are skipped; the input itself is never a level.

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

from torch import nn

from fxfeat.analyse.shapes import NodeShape
from fxfeat.trace import TracedModel

__all__ = ["Level", "LevelSearch", "StrideChange", "find_levels"]


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
        node: fx node name.
        module: path of the module whose output the node is (``""`` if none).
        reduction: spatial reduction relative to the input.
        channels: number of channels.
        fmt: layout of the node as the model computes it (``"NCHW"``, ``"NHWC"``...).
        shape: per-sample shape at the probe size.
        candidates: every feature map of the chain at this reduction (what ``levels=[...]`` could pick).
    """

    node: str
    module: str
    reduction: int | None
    channels: int | None
    fmt: str | None
    shape: tuple[int, ...]
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class LevelSearch:
    """What :func:`find_levels` found.

    Attributes:
        levels: the levels, in order of reduction.
        stride_changes: where the reduction grows along the dominator chain.
        trunk: keys of the module calls enclosing the stages, outermost first (empty: the model itself).
        candidates: for each reduction, every feature map of the chain at it that a module returns.
    """

    levels: tuple[Level, ...]
    stride_changes: tuple[StrideChange, ...]
    trunk: tuple[str, ...]
    candidates: dict[int, tuple[str, ...]]


class _Structure:
    """Positions, module-call spans and sibling facts over the dominator chain."""

    def __init__(self, traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape]):
        self.traced = traced
        self.chain = chain
        self.shapes = shapes
        self.position = {name: i for i, name in enumerate(chain)}
        self.span: dict[str, tuple[int, int]] = {}
        for i, name in enumerate(chain):
            for key in traced.node_calls.get(name, ()):
                first, _ = self.span.get(key, (i, i))
                self.span[key] = (first, i)
        self.nodes = traced.nodes
        self._twins: dict[str, bool] = {}

    def stack(self, name: str) -> tuple[str, ...]:
        return self.traced.node_calls.get(name, ())

    def is_map(self, name: str, reduction: int | None = None) -> bool:
        shape = self.shapes.get(name)
        return shape is not None and shape.is_map and (reduction is None or shape.reduction == reduction)

    def is_level_candidate(self, name: str) -> bool:
        """A feature map some module call returns, other than a pass-through ``nn.Identity``."""
        node = self.nodes[name]
        if node.op == "placeholder" or name not in self.traced.returned_by:
            return False
        if node.op == "call_module":
            return not isinstance(self.traced.root.get_submodule(node.target), nn.Identity)
        return True

    def has_twin(self, path: str) -> bool:
        """Whether the module at ``path`` has a sibling of the same class (stages, repeated blocks)."""
        if path not in self._twins:
            parent_path, _, name = path.rpartition(".")
            parent = self.traced.root.get_submodule(parent_path)
            kind = type(parent.get_submodule(name))
            self._twins[path] = any(
                other != name and type(child) is kind for other, child in parent.named_children()
            )
        return self._twins[path]

    def holds_stage_output(self, key: str, before: int) -> bool:
        """Whether a chain node of call ``key`` before position ``before`` is a block boundary returned by a
        module (not a plain container) that has a same-class sibling: the work of a stage, not of a
        downsampling unit."""
        first, _ = self.span[key]
        for name in self.chain[first:before]:
            stack = self.stack(name)
            inner = stack[stack.index(key) + 1:]
            calls = [self.traced.calls[k] for k in inner if k in self.traced.calls]
            if any(not call.is_container and name not in call.outputs for call in calls):
                continue  # in the middle of a block: not a boundary
            if any(name in call.outputs and not call.is_container and self.has_twin(call.path) for call in calls):
                return True
        return False

    def unit_of(self, name: str, other_changes: set[int]) -> str | None:
        """The outermost call containing ``name`` and no other stride change nor earlier stage output."""
        position = self.position[name]
        for key in self.stack(name):
            if key not in self.span:
                continue
            first, last = self.span[key]
            if any(first <= p <= last for p in other_changes):
                continue
            if self.holds_stage_output(key, position):
                continue
            return key
        return None

    def module_of(self, name: str, levels: list[str]) -> str:
        """Path of the outermost call that returns ``name`` and holds no other level: ``blocks.6``, not
        ``blocks`` which holds every level."""
        others = [self.stack(level) for level in levels if level != name]
        keys = [key for key in returning_calls(self.traced, name) if not any(key in stack for stack in others)]
        return outermost_path(self.traced, keys)


def returning_calls(traced: TracedModel, name: str) -> list[str]:
    """Keys of the module calls that return node ``name``. A block that returns it through an
    ``nn.Identity`` it calls last (an unused anti-aliasing layer, say) counts as returning it."""
    keys = list(traced.returned_by.get(name, ()))
    stack = traced.node_calls.get(name, ())
    for user in traced.nodes[name].users:
        if user.op == "call_module" and isinstance(traced.root.get_submodule(user.target), nn.Identity):
            keys += [key for key in traced.returned_by.get(user.name, ()) if key in stack]
    return keys


def outermost_path(traced: TracedModel, keys: list[str]) -> str:
    """Module path of the outermost of the calls ``keys`` (``""`` if there is none)."""
    if not keys:
        return ""
    return traced.calls[min(keys, key=lambda key: traced.calls[key].path.count("."))].path


def find_levels(traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape]) -> LevelSearch:
    """Discover the levels of a model (see the module docstring for the rule)."""
    structure = _Structure(traced, chain, shapes)
    positions: list[tuple[int, int, int]] = []  # (position, before, after)
    running = 1
    for i, name in enumerate(chain):
        if structure.is_map(name) and shapes[name].reduction > running:
            positions.append((i, running, shapes[name].reduction))
            running = shapes[name].reduction
    change_positions = {p for p, _, _ in positions}

    changes = []
    for position, before, after in positions:
        unit = structure.unit_of(chain[position], change_positions - {position})
        changes.append(StrideChange(chain[position], before, after, unit))

    trunk = _trunk(structure, changes)
    levels: list[str] = []
    for change in changes:
        entry = structure.span[change.unit][0] if change.unit else structure.position[change.node]
        level = _last_candidate(structure, range(entry - 1, -1, -1), change.before, stop_on_other=True)
        if level is not None:
            levels.append(level)
    inside_trunk = [i for i, name in enumerate(chain) if not trunk or trunk[-1] in structure.stack(name)]
    last = _last_candidate(structure, reversed(inside_trunk), running, stop_on_other=False)
    if last is None:
        last = _last_candidate(structure, range(len(chain) - 1, -1, -1), running, stop_on_other=False)
    if last is not None and last not in levels:
        levels.append(last)

    by_reduction: dict[int, list[str]] = defaultdict(list)
    for name in chain:
        if structure.is_map(name) and structure.is_level_candidate(name):
            by_reduction[shapes[name].reduction].append(name)
    result = tuple(
        Level(
            node=name,
            module=structure.module_of(name, levels),
            reduction=shapes[name].reduction,
            channels=shapes[name].channels,
            fmt=shapes[name].fmt,
            shape=shapes[name].shape,
            candidates=tuple(by_reduction[shapes[name].reduction]),
        )
        for name in levels
    )
    candidates = {reduction: tuple(names) for reduction, names in by_reduction.items()}
    return LevelSearch(result, tuple(changes), trunk, candidates)


def _last_candidate(structure: _Structure, positions, reduction: int, stop_on_other: bool) -> str | None:
    """The first level candidate at ``reduction`` met walking ``positions``."""
    for i in positions:
        name = structure.chain[i]
        if not structure.is_map(name):
            continue
        if structure.shapes[name].reduction != reduction:
            if stop_on_other:
                return None
            continue
        if structure.is_level_candidate(name):
            return name
    return None


def _trunk(structure: _Structure, changes: list[StrideChange]) -> tuple[str, ...]:
    """Keys of the calls enclosing every unit but the stem's, outermost first (their common prefix)."""
    prefixes = []
    for change in changes[1:]:
        stack = structure.stack(change.node)
        prefixes.append(stack[: stack.index(change.unit)] if change.unit else stack)
    if not prefixes:
        return ()
    common = prefixes[0]
    for prefix in prefixes[1:]:
        length = 0
        while length < min(len(common), len(prefix)) and common[length] == prefix[length]:
            length += 1
        common = common[:length]
    return tuple(common)
