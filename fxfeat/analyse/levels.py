"""Find the feature levels of a model: one node per spatial reduction, chosen by one structural rule.

The rule works on the *dominator chain* (nodes every input-to-output path passes through, in-place writes
included as new versions of the tensor they write), the reduction of each node on it, and the module calls
recorded by the tracer. A call is *repeated* when its module has a sibling of the same class (stages, blocks,
the layers of a VGG stage); plain containers (``nn.Sequential``...) count, as stages often are containers.

0. **A returned pyramid.** A model that returns maps at several reductions (a list, tuple or dict: a backbone, an
   encoder, an FPN) has those maps as its levels, in the order it returns them; the rest of the rule is for
   models that return one thing.
1. **Stride changes.** Walking the chain, a feature map whose reduction exceeds every earlier one changes the
   stride.
2. **Downsampling units.** The unit of a stride change is the outermost module call that contains it and no
   other change, and that is repeated, or, if it is not, holds no repeated call that ends before the change
   (a call holding such a thing is a container of stages, so the unit is inside it). ResNet's unit is
   ``layer2``, EfficientNet's ``blocks.2``, a flat ``features`` container's the strided block, DenseNet's the
   transition, a VGG stage's the max pooling, a stem's its strided convolution or pooling.
3. **Trunk.** The innermost call holding the units of the last change and of another one: the container of the
   stages (``blocks``, ``stages``, ``features``), or the model itself.
4. **Levels.** The level of a change's old reduction is the last feature map fed into its unit; it is a
   module's output. The stem (the call making the first change, unless it is the trunk) is one unit: a map
   inside it is not a level if the stem goes on to change the stride with a convolution (ViT-era stems that
   halve the resolution twice), but one the stem then max-pools is finished (ResNet's, DPN's).
5. **The deepest level** is the output of the trunk's last repeated call at the final reduction: a final
   layer the trunk holds once (ReXNet's 1x1 conv, DPN's closing norm) or a layer after the trunk (EfficientNet's
   ``conv_head``, a final norm) is head, not a level; DenseNet's ``norm5`` repeats ``norm0``, so it is one.

6. **An isotropic body** replaces all of that: when, after the last change, the repeated children of one module
   (a ViT's ``blocks``; blocks, not single layers) each return a map or token grid at the final reduction, hold
   most of the module outputs after the change's stem (the patch embedding), and are not one stage among stages,
   every block's output is a level.

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

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxfeat.analyse.aliases import Aliases
from fxfeat.analyse.shapes import NodeShape, TokenGrid
from fxfeat.trace import TracedModel

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


def returning_calls(traced: TracedModel, name: str, versions: dict[str, list[str]] | None = None) -> list[str]:
    """Keys of the module calls that return node ``name``.

    A block that returns it through ``nn.Identity`` calls it makes last (an unused anti-aliasing layer, a norm's
    unused dropout and activation, one after the other) counts as returning it; so does a call whose returned
    tensor was last written by ``name`` (``versions``, from :func:`returned_versions`).
    """
    keys = list(traced.returned_by.get(name, ()))
    stack = traced.node_calls.get(name, ())
    passed = [name]
    while passed:
        for user in traced.nodes[passed.pop()].users:
            if user.op == "call_module" and isinstance(traced.root.get_submodule(user.target), nn.Identity):
                keys += [key for key in traced.returned_by.get(user.name, ()) if key in stack]
                passed.append(user.name)
    return keys + list((versions or {}).get(name, ()))


def returned_versions(traced: TracedModel, aliases: Aliases) -> dict[str, list[str]]:
    """For each write that is the last version of a tensor some call returns (``out.add_(y); return out``): the
    keys of those calls."""
    last_node: dict[str, str] = {}
    for name, stack in traced.node_calls.items():
        for key in stack:
            last_node[key] = name  # node_calls follows graph order, so the last node of each call wins
    versions: dict[str, list[str]] = defaultdict(list)
    for call in traced.calls.values():
        for output in call.outputs:
            if call.key in last_node and output in aliases.order:
                version = aliases.version_at_end_of(output, last_node[call.key])
                if version != output:
                    versions[version].append(call.key)
    return dict(versions)


def outermost_path(traced: TracedModel, keys: list[str]) -> str:
    """Module path of the outermost of the calls ``keys`` (``""`` if there is none)."""
    if not keys:
        return ""
    return traced.calls[min(keys, key=lambda key: traced.calls[key].path.count("."))].path


_POOLING_MODULES = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd)
_POOLING_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.lp_pool1d, F.lp_pool2d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
}


# Modules and functions that return their input, or their input with a border: never a level of their own.
_PASS_THROUGH_MODULES = (
    nn.Identity, nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.ZeroPad2d, nn.CircularPad2d,
)
_PASS_THROUGH_FUNCTIONS = {F.pad, torch.constant_pad_nd}
# Functions and methods that move values around a map while keeping its shape: never an element-wise step.
_REARRANGING_FUNCTIONS = {torch.roll, torch.flip, torch.transpose, torch.permute, torch.rot90, torch.reshape,
                          operator.getitem, torch.flatten, torch.unflatten, torch.swapaxes, torch.movedim}
_REARRANGING_METHODS = {"roll", "flip", "transpose", "permute", "rot90", "reshape", "view", "flatten", "unflatten",
                        "swapaxes", "movedim", "expand", "repeat", "__getitem__"}
# Regularisation, not a feature transform (an identity in eval mode, noise in training): a level stops before it,
# as a forward hook on the module before it sees the map.
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      torch.dropout, torch.dropout_, torch.feature_dropout, torch.alpha_dropout}


class _Structure:
    """Positions, module-call spans and repetition facts over the dominator chain."""

    def __init__(self, traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape],
                 versions: dict[str, list[str]], tensors: dict[str, str] | None = None):
        self.traced = traced
        self.tensors = tensors or {}  # writes standing for another node's tensor: that node
        self.chain = chain
        self.shapes = shapes
        self.position = {name: i for i, name in enumerate(chain)}
        self.span: dict[str, tuple[int, int]] = {}
        for i, name in enumerate(chain):
            for key in traced.node_calls.get(name, ()):
                first, _ = self.span.get(key, (i, i))
                self.span[key] = (first, i)
        self.path_spans: dict[str, tuple[int, int]] = {}
        for key, (first, last) in self.span.items():
            parts = traced.calls[key].path.split(".")
            for depth in range(1, len(parts) + 1):
                prefix = ".".join(parts[:depth])
                old = self.path_spans.get(prefix, (first, last))
                self.path_spans[prefix] = (min(old[0], first), max(old[1], last))
        self.nodes = traced.nodes
        self.versions = versions
        self._returned: dict[str, bool] = {}
        self._continues: dict[str, str | None] = {}
        self.order = {node.name: i for i, node in enumerate(traced.graph.nodes)}
        self.call_end: dict[str, int] = {}  # graph position of each call's last node
        self.children: dict[str, set[str]] = defaultdict(set)  # the calls made directly inside each call
        for name, stack in traced.node_calls.items():
            for depth, key in enumerate(stack):
                self.call_end[key] = max(self.call_end.get(key, -1), self.order[name])
                if depth + 1 < len(stack):
                    self.children[key].add(stack[depth + 1])
        self._holds_weights: dict[str, bool] = {}
        self._repeated: dict[str, bool] = {}
        self.trunk = ""  # module path of the trunk ("": the model)
        self.dilation_factor = [1] * len(chain)  # per chain position, the dilated stride changes' factor so far
        self.stem: str | None = None
        self.change_positions: list[int] = []

    def stack(self, name: str) -> tuple[str, ...]:
        return self.traced.node_calls.get(name, ())

    def is_map(self, name: str, reduction: int | None = None) -> bool:
        """A feature map or a token sequence on a grid of the input (at ``reduction``, if given: its
        :meth:`reduction`)."""
        shape = self.shapes.get(name)
        return shape is not None and shape.is_spatial and (reduction is None or self.reduction(name) == reduction)

    def reduction(self, name: str) -> int | None:
        """A map's reduction as if its dilated convolutions were strided: its measured reduction times the
        dilation factors of the dilated stride changes before it (:func:`_dilated_changes`; 1 in most models)."""
        shape = self.shapes.get(name)
        if shape is None or shape.reduction is None:
            return None
        position = self.position.get(name)
        return shape.reduction * (self.dilation_factor[position] if position is not None else 1)

    def is_identity(self, key: str) -> bool:
        call = self.traced.calls.get(key)
        return call is not None and issubclass(call.module_type, nn.Identity)

    def is_repeated(self, key: str) -> bool:
        """Whether the module of call ``key`` has a sibling of the same class (stages, blocks, VGG's layers)."""
        call = self.traced.calls.get(key)
        if call is None or not call.path or self.is_identity(key):
            return False
        if call.path not in self._repeated:
            parent_path, _, name = call.path.rpartition(".")
            parent = self.traced.root.get_submodule(parent_path)
            kind = type(parent.get_submodule(name))
            self._repeated[call.path] = any(
                other != name and type(child) is kind for other, child in parent.named_children()
            )
        return self._repeated[call.path]

    def child_of(self, key: str | None, name: str) -> str | None:
        """The call directly inside ``key`` (``None``: the model) that created node ``name``."""
        stack = self.stack(name)
        if key is not None and key not in stack:
            return None
        depth = stack.index(key) + 1 if key is not None else 0
        return stack[depth] if depth < len(stack) else None

    def holds_repeated_child_before(self, key: str, position: int) -> bool:
        """Whether call ``key`` holds, before chain position ``position``, a repeated call that ends there."""
        first, _ = self.span[key]
        for name in self.chain[first:position]:
            child = self.child_of(key, name)
            if child is not None and self.span[child][1] < position and self.is_repeated(child):
                return True
        return False

    def holds_block_before(self, key: str, position: int) -> bool:
        """Whether call ``key`` holds, before chain position ``position``, its stage's blocks (a list of blocks
        holding convolutions or linear layers, or a member of one, :meth:`is_listed_block`) ending there: it
        downsamples at its end."""
        change = self.order[self.chain[position]]
        old = next((self.reduction(name) for name in reversed(self.chain[:position]) if self.is_map(name)), None)
        return any(self.call_end[child] < change and self.holds_weights_layer(child)
                   and self.is_listed_block(child, key)
                   and any(self.is_map(output) and self.shapes[output].reduction * self.factor_at(output) == old
                           for output in self.traced.calls[child].outputs)
                   for child in self.children.get(key, ()))  # off the chain too: residual blocks are

    def factor_at(self, name: str) -> int:
        """The dilation factor (:meth:`reduction`) where node ``name`` lies: that of the chain node before it."""
        order = self.order[name]
        factor = 1
        for i, chained in enumerate(self.chain):
            if self.order[chained] > order:
                break
            factor = self.dilation_factor[i]
        return factor

    def is_listed_block(self, child: str, key: str) -> bool:
        """Whether call ``child`` (inside call ``key``) is a list of blocks or one of its members: a container
        (``nn.Sequential``), or an element of a list the model iterates (a stage's ``blocks``), rather than a layer
        the unit holds for itself (a transition's convolution before its pooling, an inverted residual's
        expansion: same-class siblings are no sign here, a block is often made of one wrapper class)."""
        call = self.traced.calls[child]
        return call.is_container or call.path.rpartition(".")[0] != self.traced.calls[key].path

    def holds_weights_layer(self, key: str) -> bool:
        """Whether the module of call ``key`` is a block holding a convolution or linear layer (not one such
        layer itself, and not a norm with its activation)."""
        if key not in self._holds_weights:
            module = self.traced.root.get_submodule(self.traced.calls[key].path)
            self._holds_weights[key] = any(isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear))
                                           for layer in module.modules() if layer is not module)
        return self._holds_weights[key]

    def unit_of(self, position: int) -> str | None:
        """The downsampling unit of the stride change at chain ``position`` (rule 2): the outermost call holding
        it and no other change that is repeated and starts with it (a stage whose blocks come first downsamples
        at its end: the unit is inside it, Swin's patch merging), or that is not repeated and holds no repeated
        call before it (a container of stages)."""
        others = [p for p in self.change_positions if p != position]
        stack = self.stack(self.chain[position])
        for depth, key in enumerate(stack):
            if key not in self.span:
                continue
            first, last = self.span[key]
            if any(first <= p <= last for p in others):
                continue
            if self.is_repeated(key):
                if not self.holds_block_before(key, position):
                    return key
            elif not self.holds_repeated_child_before(key, position) and not (
                    depth + 1 < len(stack) and self.holds_block_before(stack[depth + 1], position)):
                return key  # (a container whose stage downsamples at its end is a container of stages)
        return None

    def is_pass_through(self, name: str) -> bool:
        """A module or function that returns its input, or its input with a border (``nn.Identity``, paddings)."""
        node = self.nodes[name]
        if node.op == "call_module":
            return isinstance(self.traced.root.get_submodule(node.target), _PASS_THROUGH_MODULES)
        return node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS

    def is_returned(self, name: str) -> bool:
        """A module call returns node ``name``, which is not a pass-through (``nn.Identity``) nor a padding (the
        border a max pooling needs); the input is no level."""
        if name not in self._returned:
            node = self.nodes[name]
            self._returned[name] = node.op != "placeholder" and not self.is_pass_through(name) and bool(
                returning_calls(self.traced, name, self.versions))
        return self._returned[name]

    def is_pooling(self, name: str) -> bool:
        """Whether node ``name`` is a (non-adaptive) pooling: it only subsamples the map it is given."""
        node = self.nodes[name]
        if node.op == "call_module":
            return isinstance(self.traced.root.get_submodule(node.target), _POOLING_MODULES)
        return node.op == "call_function" and node.target in _POOLING_FUNCTIONS

    def inside_stem(self, name: str) -> bool:
        """Whether ``name`` lies inside the stem (the call making the first stride change, other than the
        trunk), before a later stride change the stem makes with something other than a pooling."""
        if self.stem is None or self.stem not in self.stack(name):
            return False
        position, (_, last) = self.position[name], self.span[self.stem]
        return any(position < p <= last and not self.is_pooling(self.chain[p]) for p in self.change_positions)

    def is_candidate(self, name: str, reduction: int, continued: bool = False) -> bool:
        """A map at ``reduction`` a module returns (or, with ``continued``, element-wise functions compute from
        one: :meth:`continues`), outside the stem."""
        return (self.is_map(name, reduction) and (self.is_returned(name) or continued and bool(self.continues(name)))
                and not self.inside_stem(name))

    def continues(self, name: str) -> str | None:
        """For a function or method that computes a map element-wise from maps of its own shape (an activation, a
        functional norm, ``x * 0.5``, a residual sum ``x + block(x)``), the module output it continues: its map
        operand computed last, if a module returns it, else the one that operand continues. ``None`` otherwise.
        Such a node is the map a module produced, carried on between module calls (``torch.relu(self.down(x))``)."""
        if name not in self._continues:
            self._continues[name] = None
            node, shape = self.nodes[name], self.shapes.get(name)
            rearranges = (node.target in _REARRANGING_FUNCTIONS or node.target in _REARRANGING_METHODS
                          or node.target in _DROPOUT_FUNCTIONS)
            if node.op in ("call_function", "call_method") and not rearranges and self.is_map(name):
                operands = [arg.name for arg in node.all_input_nodes if self.is_map(arg.name)]
                if operands and all(self.shapes[operand].shape == shape.shape and self.shapes[operand].fmt == shape.fmt
                                    for operand in operands):
                    latest = max(operands, key=self.order.__getitem__)
                    while self.is_pass_through(latest) and self.nodes[latest].all_input_nodes:  # nn.Identity
                        latest = self.nodes[latest].all_input_nodes[0].name
                    self._continues[name] = latest if self.is_returned(latest) else self.continues(latest)
        return self._continues[name]

    def last_candidate(self, positions, reduction: int) -> str | None:
        """Walking ``positions``, the first candidate at ``reduction`` (element-wise continuations of a module's
        output included), stopping at a map at another one."""
        for i in positions:
            name = self.chain[i]
            if not self.is_map(name):
                continue
            if self.reduction(name) != reduction:
                return None
            if self.is_candidate(name, reduction, continued=True):
                return name
        return None

    def carried_on(self, name: str) -> str:
        """``name``, or the last of the element-wise functions that follow it on the chain, each reading the one
        before, between module calls (a functional activation between the last stage and a functional global
        pool; not the functions inside a norm module after the trunk, which is head)."""
        level = current = name
        for following in self.chain[self.position[name] + 1:]:
            read = {arg.name for arg in self.nodes[following].all_input_nodes}
            if current not in read and self.tensors.get(current) not in read:  # a write stands for its tensor
                break
            if self.is_pass_through(following):  # an nn.Identity the block calls last: the same tensor
                current = following
                continue
            stack = self.stack(following)
            if self.continues(following) is None or stack != self.stack(level)[: len(stack)]:
                break  # not an element-wise function reading it, or one inside a module of its own (a norm)
            level = current = following
        return level

    def head_start(self, reduction: int) -> int:
        """Chain position after the trunk's last repeated call at ``reduction`` (rule 5); the end of the trunk
        if it has none."""
        inside = [i for i, name in enumerate(self.chain) if self.call_inside(self.trunk, name, itself=True)]
        end = inside[-1] + 1 if inside else len(self.chain)
        repeated_ends = []
        for i in inside:
            child = self.call_inside(self.trunk, self.chain[i])
            if child is not None and self.is_repeated(child) and self.is_map(self.chain[i], reduction):
                repeated_ends.append(self.span[child][1] + 1)
        return max(repeated_ends, default=end)

    def call_inside(self, path: str, name: str, itself: bool = False) -> str | None:
        """The outermost call that created node ``name`` inside module ``path`` (``""``: the model), or with
        ``itself`` also the call of ``path`` itself; ``None`` if the node is not inside it."""
        for key in self.stack(name):
            own = self.traced.calls[key].path
            if not path or own.startswith(path + ".") or itself and own == path:
                return key
        return None

    def path_span(self, path: str) -> tuple[int, int] | None:
        """First and last chain positions inside module ``path``, called or not (a ``ModuleList`` is not)."""
        return self.path_spans.get(path)

    def block_run(self, change: int, reduction: int) -> list[str]:
        """The isotropic body of the model, if it has one (rule 6): the outputs of the repeated children of one
        module that lies wholly after chain position ``change`` (the last stride change), each a block (a call
        traced through, not one layer) returning a map or token grid at ``reduction``. The longest such run is
        the body if it has at least two members, holds most of the module outputs the chain computes after the
        change's stem (the calls holding the change that end before the run's module: a patch embedding), and
        its module is not one stage among stages (:meth:`is_stage_among_stages`). Empty: no isotropic body."""
        runs: dict[str, dict[str, str]] = defaultdict(dict)  # parent path -> {output node: child call}
        for i in range(change + 1, len(self.chain)):
            name = self.chain[i]
            if not self.is_candidate(name, reduction):
                continue
            for key in self.stack(name):
                parent = self.traced.calls[key].path.rpartition(".")[0]
                if not parent or self.path_span(parent)[0] <= change or not self.is_repeated(key):
                    continue
                if not self.is_block(key):
                    continue
                if self.span[key][1] == i:
                    runs[parent].setdefault(name, key)
        best: list[str] = []
        for parent, members in runs.items():
            start = self.path_span(parent)[0]
            stem_end = max((self.span[key][1] for key in self.stack(self.chain[change])
                            if key in self.span and self.span[key][1] < start), default=change)
            outputs = [i for i in range(stem_end + 1, len(self.chain)) if self.is_candidate(self.chain[i], reduction)]
            inside = sum(1 for i in outputs if any(self.span[key][0] <= i <= self.span[key][1]
                                                    for key in members.values()))
            if (len(members) >= 2 and len(members) > len(best) and 2 * inside > len(outputs)
                    and not self.is_stage_among_stages(parent, reduction)):
                best = list(members)
        return best

    def is_block(self, key: str) -> bool:
        """Whether call ``key`` is a block (traced through, or a leaf made of submodules) rather than one layer."""
        call = self.traced.calls[key]
        return not call.is_leaf or any(True for _ in self.traced.root.get_submodule(call.path).children())

    def is_stage_among_stages(self, path: str, reduction: int) -> bool:
        """Whether module ``path`` or one enclosing it has a same-class sibling whose last map on the chain, or
        any map on the chain inside it, is at a reduction other than ``reduction`` (DenseNet's last dense block,
        ConvNeXt's last stage, a stage after one that runs at another reduction and merges at its end)."""
        while path:
            parent_path, _, name = path.rpartition(".")
            parent = self.traced.root.get_submodule(parent_path)
            kind = type(parent.get_submodule(name))
            for other, child in parent.named_children():
                span = self.path_span(f"{parent_path}.{other}" if parent_path else other)
                if other == name or type(child) is not kind or span is None:
                    continue
                inside = self.chain[span[0]: span[1] + 1]
                if any(self.is_map(name) and self.reduction(name) != reduction for name in inside):
                    return True
            path = parent_path
        return False

    def module_of(self, name: str, levels: list[str]) -> str:
        """Path of the outermost call that returns ``name`` (or the module output it :meth:`continues`) and holds
        no other level: ``blocks.6``, not ``blocks`` which holds every level."""
        others = [self.stack(level) for level in levels if level != name]
        produced = name if self.is_returned(name) or not self.continues(name) else self.continues(name)
        keys = [key for key in returning_calls(self.traced, produced, self.versions)
                if not any(key in stack for stack in others)]
        return outermost_path(self.traced, keys)


def _stride_changes(structure: _Structure) -> list[StrideChange]:
    """Rule 1 and 2: where the (dilation-aware) reduction grows along the chain, and each change's unit."""
    positions: list[tuple[int, int, int]] = []  # (position, before, after)
    running = 1
    for i, name in enumerate(structure.chain):
        if structure.is_map(name) and structure.reduction(name) > running:
            positions.append((i, running, structure.reduction(name)))
            running = structure.reduction(name)
    structure.change_positions = [p for p, _, _ in positions]
    return [StrideChange(structure.chain[p], before, after, structure.unit_of(p)) for p, before, after in positions]


def _dilated_changes(structure: _Structure) -> dict[int, int]:
    """Dilated stride changes, by chain position, with their factor: a spatial convolution inside the trunk whose
    dilation exceeds every one before it, and that no convolution after it in the trunk goes below, replaced a
    stride (torchvision's ``replace_stride_with_dilation``, timm's ``output_stride``): the first chain map after it
    is a change of reduction by the dilation's growth, as the undilated model's would be. A dilation that does not
    persist (a selective-kernel branch beside an undilated one, an ASPP head) is no such change."""
    trunk = structure.trunk
    convolutions = []  # (graph position, dilation) of the trunk's spatial convolutions
    for node in structure.traced.graph.nodes:
        if node.op != "call_module" or not (not trunk or node.target.startswith(trunk + ".")):
            continue
        layer = structure.traced.root.get_submodule(node.target)
        if isinstance(layer, nn.modules.conv._ConvNd) and max(layer.kernel_size) > 1:
            convolutions.append((structure.order[node.name], max(layer.dilation)))
    dilated: dict[int, int] = {}
    running = 1
    for index, (order, dilation) in enumerate(convolutions):
        if dilation > running and all(later >= dilation for _, later in convolutions[index:]):
            after = next((i for i, name in enumerate(structure.chain)
                          if structure.order[name] > order and structure.is_map(name)), None)
            if after is not None:
                dilated[after] = dilated.get(after, 1) * dilation // running
            running = dilation
    return dilated


def _trunk(structure: _Structure, changes: list[StrideChange]) -> str:
    """Path of the innermost module, called or not, that holds the last change's unit and another change (rule 3):
    the container of the stages, or of the blocks when no stages group them (a flat ``nn.ModuleList`` the
    model's ``forward`` iterates); ``""``: the model."""
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
        if path in called or members - units:  # a list of the downsampling layers alone (Twins' patch
            return path  # embeddings, beside its stages) is not the trunk: it holds no block that keeps the size
    return ""


def returned_maps(traced: TracedModel, shapes: dict[str, NodeShape]) -> list[tuple[str, str | None]]:
    """The maps (and token grids) the model returns, in return order, each with the key of the dict that holds it
    (``None`` in a list or tuple); the input itself and empty placeholders (zero channels) are left out."""
    output = next(node for node in reversed(traced.graph.nodes) if node.op == "output")
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
    versions: dict[str, list[str]] | None = None, tensors: dict[str, str] | None = None,
    head_begins_after: str | None = None,
) -> LevelSearch:
    """Discover the levels of a model (see the module docstring for the rule).

    Args:
        traced: the traced model.
        chain: its dominator chain.
        shapes: shape of every node; a write into a view of a tensor has the shape of the whole tensor.
        versions: calls whose returned tensor is last written by a write, by write (:func:`returned_versions`).
        tensors: for writes standing for another node's tensor, that node.
        head_begins_after: the node after which a fully-convolutional head begins (its classifier is a convolution
            applied to the map before the global pool): no level lies after it.
    """
    structure = _Structure(traced, chain, shapes, versions or {}, tensors)
    changes = _stride_changes(structure)
    structure.trunk = _trunk(structure, changes)
    dilated = _dilated_changes(structure)
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
    body = structure.block_run(structure.change_positions[-1], running) if changes else []
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
    tensors = tensors or {}
    result = tuple(
        Level(
            node=name,
            module=structure.module_of(name, levels),
            reduction=shapes[name].reduction,
            channels=shapes[name].channels,
            fmt=shapes[name].fmt,
            shape=shapes[name].shape,
            candidates=tuple(by_reduction[shapes[name].reduction]),
            tensor=tensors.get(name),
            grid=shapes[name].grid,
            key=keys.get(name),
            module_output=structure.is_returned(name),
        )
        for name in levels
    )
    candidates = {reduction: tuple(names) for reduction, names in by_reduction.items()}
    return LevelSearch(result, tuple(changes), structure.trunk, candidates, isotropic=bool(body))
