"""What the level rule reads about a traced model: which module calls return a node, and, over the chain the levels
lie on, positions, call spans, repetition, element-wise continuations and the other structural facts the rules of
:mod:`fxfeat.analyse.levels` are written in.
"""

from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from fxfeat.analyse.aliases import Aliases
from fxfeat.analyse.shapes import NodeShape
from fxfeat.trace import TracedModel

__all__ = ["Structure", "outermost_path", "returned_versions", "returning_calls"]


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


class Structure:
    """Positions, module-call spans and repetition facts over the dominator chain."""

    def __init__(self, traced: TracedModel, chain: tuple[str, ...], shapes: dict[str, NodeShape],
                 versions: dict[str, list[str]], write_tensors: dict[str, str] | None = None):
        self.traced = traced
        self.write_tensors = write_tensors or {}  # writes standing for another node's tensor: that node
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
        dilation factors of the dilated stride changes before it (:func:`fxfeat.analyse.dilation.dilated_changes`;
        1 in most models)."""
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

    def _is_kind(self, name: str, modules: tuple[type, ...], functions: set) -> bool:
        """Whether node ``name`` calls one of ``modules`` or ``functions``."""
        node = self.nodes[name]
        if node.op == "call_module":
            return isinstance(self.traced.root.get_submodule(node.target), modules)
        return node.op == "call_function" and node.target in functions

    def is_pass_through(self, name: str) -> bool:
        """A module or function that returns its input, or its input with a border (``nn.Identity``, paddings)."""
        return self._is_kind(name, _PASS_THROUGH_MODULES, _PASS_THROUGH_FUNCTIONS)

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
        return self._is_kind(name, _POOLING_MODULES, _POOLING_FUNCTIONS)

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
            if current not in read and self.write_tensors.get(current) not in read:  # a write stands for its tensor
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

    def module_of(self, name: str, levels: list[str]) -> str:
        """Path of the outermost call that returns ``name`` (or the module output it :meth:`continues`) and holds
        no other level: ``blocks.6``, not ``blocks`` which holds every level."""
        others = [self.stack(level) for level in levels if level != name]
        produced = name if self.is_returned(name) or not self.continues(name) else self.continues(name)
        keys = [key for key in returning_calls(self.traced, produced, self.versions)
                if not any(key in stack for stack in others)]
        return outermost_path(self.traced, keys)
