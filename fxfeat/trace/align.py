"""Give the training-mode graph the node names of the inference graph, so one plan rewrites both.

An extractor runs the graph traced in eval mode under ``.eval()`` and the one traced in train mode under
``.train()``. The analyses and the plan work on the eval graph and name its nodes; the train graph holds the same
computation plus what only training runs (drop path's random mask, an auxiliary branch) with different flags
(``F.dropout(x, p, training=True)``). :func:`align_training_graph` matches each eval node with the train node
that computes the same value and returns a copy of the train graph in which matched nodes carry the eval names
(nodes only training runs keep their own names, prefixed ``training_``).

A node matches when it is made by the same module call (its innermost ``nn_module_stack`` entry), with the same
op and target, and its arguments match: the matched counterparts of the eval node's arguments, where a train
argument may be computed from that counterpart by training-only nodes (``x * mask / keep`` for ``x``); the same
constants, except that numbers, booleans and ``None`` may differ (training flags and rates:
``F.dropout(x, p, self.training)``, ``dropout_p=p if self.training else 0.0``). Candidates are tried in graph
order, so an insertion only training makes (an extra ``add`` in a block) does not shift the matches after it.

Example:
    >>> import torch
    >>> from torch import fx, nn
    >>> class Noisy(nn.Module):
    ...     def forward(self, x):
    ...         y = x.relu()
    ...         if self.training:
    ...             y = y * torch.rand_like(y)
    ...         return y.relu()
    >>> eval_graph = fx.symbolic_trace(Noisy().eval()).graph
    >>> train_graph = fx.symbolic_trace(Noisy().train()).graph
    >>> aligned, _ = align_training_graph(eval_graph, {}, train_graph, {})
    >>> [node.name for node in aligned.nodes]
    ['x', 'relu', 'training_rand_like', 'training_mul', 'relu_1', 'output']
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx

from fxfeat.trace.values import check_input_shape

__all__ = ["AlignmentError", "align_training_graph"]

_CONSTANT_PREFIX = "_tensor_constant"  # torch.fx's names for tensors the code creates
_PREFIX = "training_"  # names of the nodes only training runs
_SEARCH_LIMIT = 256  # training-only nodes followed back from an argument
_SCALARS = (bool, int, float, type(None))  # constants training may set otherwise


class AlignmentError(Exception):
    """The train graph cannot be matched with the eval graph (internal: compile falls back to one graph)."""


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), "") if stack else ""


def _key(node: fx.Node) -> tuple:
    target = node.target
    if node.op == "get_attr" and str(target).startswith(_CONSTANT_PREFIX):
        target = _CONSTANT_PREFIX
    return _scope(node), node.op, target


def _same_tensor(a: object, b: object) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))


class _Matcher:
    def __init__(self, eval_targets: dict[str, object], train_targets: dict[str, object]):
        self.eval_targets, self.train_targets = eval_targets, train_targets
        self.match: dict[fx.Node, fx.Node] = {}  # eval node -> train node
        self.matched: set[fx.Node] = set()  # train nodes matched

    def _computed_from(self, value: fx.Node, source: fx.Node) -> bool:
        """Whether training-only nodes compute ``value`` from ``source``."""
        stack, seen = [value], set()
        while stack and len(seen) < _SEARCH_LIMIT:
            node = stack.pop()
            if node is source:
                return True
            if node in seen or node in self.matched:
                continue
            seen.add(node)
            stack.extend(node.all_input_nodes)
        return False

    def same(self, eval_value: object, train_value: object) -> bool:
        if isinstance(eval_value, fx.Node):
            counterpart = self.match.get(eval_value)
            return isinstance(train_value, fx.Node) and counterpart is not None and (
                train_value is counterpart
                or (train_value not in self.matched and self._computed_from(train_value, counterpart)))
        if isinstance(eval_value, (list, tuple)):
            return (type(eval_value) is type(train_value) and len(eval_value) == len(train_value)
                    and all(self.same(a, b) for a, b in zip(eval_value, train_value)))
        if isinstance(eval_value, dict):
            return (isinstance(train_value, dict) and eval_value.keys() == train_value.keys()
                    and all(self.same(eval_value[k], train_value[k]) for k in eval_value))
        if isinstance(eval_value, slice):
            return isinstance(train_value, slice) and self.same(
                (eval_value.start, eval_value.stop, eval_value.step),
                (train_value.start, train_value.stop, train_value.step))
        if isinstance(eval_value, _SCALARS) and isinstance(train_value, _SCALARS):
            return True  # a training flag or rate (`dropout_p=p if self.training else 0.0`)
        if isinstance(eval_value, torch.Tensor):
            return _same_tensor(eval_value, train_value)
        return type(eval_value) is type(train_value) and eval_value == train_value

    def same_node(self, eval_node: fx.Node, train_node: fx.Node) -> bool:
        if eval_node.op == "get_attr" and _key(eval_node)[2] == _CONSTANT_PREFIX:
            return _same_tensor(self.eval_targets.get(eval_node.target), self.train_targets.get(train_node.target))
        return self.same(eval_node.args, train_node.args) and self.same(eval_node.kwargs, train_node.kwargs)


def _add_shape_check(eval_graph: fx.Graph, train_graph: fx.Graph) -> None:
    """Give the train graph the input-shape check of a shape-specialised eval graph."""
    check = next((node for node in eval_graph.nodes if node.op == "call_function"
                  and node.target is check_input_shape), None)
    if check is None:
        return
    image = next(node for node in train_graph.nodes if node.op == "placeholder")
    with train_graph.inserting_after(image):
        checked = train_graph.call_function(check_input_shape, (image, *check.args[1:]))
    checked.meta = dict(check.meta)
    image.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)


def align_training_graph(
    eval_graph: fx.Graph, eval_targets: dict[str, object], train_graph: fx.Graph, train_targets: dict[str, object],
) -> tuple[fx.Graph, dict[str, object]]:
    """A copy of ``train_graph`` whose nodes carry the names of their eval counterparts, and its targets (tensor
    constants renamed where they clash with different eval ones).

    Eval nodes without a counterpart (computed only in eval mode) are absent from the copy: the caller checks
    that the nodes it needs are there.

    Raises:
        AlignmentError: a matched node cannot get its eval name.
    """
    _add_shape_check(eval_graph, train_graph)
    matcher = _Matcher(eval_targets, train_targets)
    candidates: dict[tuple, list[fx.Node]] = {}
    for node in train_graph.nodes:
        candidates.setdefault(_key(node), []).append(node)
    start: dict[tuple, int] = {}
    for node in eval_graph.nodes:
        if node.op == "output":
            continue
        key = _key(node)
        group = candidates.get(key, [])
        for position in range(start.get(key, 0), len(group)):
            if matcher.same_node(node, group[position]):
                matcher.match[node] = group[position]
                matcher.matched.add(group[position])
                start[key] = position + 1
                break
    names = {train: eval_node.name for eval_node, train in matcher.match.items()}
    targets = _targets(train_graph, train_targets, eval_targets)  # renames clashing constants: before the copy
    return _renamed(train_graph, names, set(names.values())), targets


def _targets(graph: fx.Graph, train_targets: dict[str, object], eval_targets: dict[str, object]) -> dict[str, object]:
    """The train graph's targets; a tensor constant named like a different eval constant is renamed."""
    targets = {}
    for node in graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        value = train_targets[node.target]
        if node.target in eval_targets and eval_targets[node.target] is not value and not _same_tensor(
                eval_targets[node.target], value):
            index = 0
            while f"_training_constant{index}" in train_targets or f"_training_constant{index}" in targets:
                index += 1
            node.target = f"_training_constant{index}"
        targets[node.target] = value
    return targets


def _renamed(graph: fx.Graph, names: dict[fx.Node, str], reserved: set[str]) -> fx.Graph:
    """A copy of ``graph`` with ``names`` for its nodes and ``training_`` names for the others."""
    copy = fx.Graph(tracer_cls=graph._tracer_cls, tracer_extras=graph._tracer_extras)
    copy._codegen = graph._codegen
    new: dict[fx.Node, fx.Node] = {}
    lookup: Callable[[fx.Node], fx.Node] = new.__getitem__
    for node in graph.nodes:
        wanted = names.get(node)
        if wanted is None and node.op not in ("placeholder", "output"):
            wanted = _PREFIX + node.name
            while wanted in reserved:
                wanted = _PREFIX + wanted
        created = copy.create_node(node.op, node.target, fx.node.map_arg(node.args, lookup),
                                   fx.node.map_arg(node.kwargs, lookup), name=wanted, type_expr=node.type)
        if node in names and created.name != wanted:
            raise AlignmentError(f"node name {wanted!r} is taken in the training-mode graph")
        created.meta = dict(node.meta)
        new[node] = created
    return copy
