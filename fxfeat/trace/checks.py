"""The model's own checks of its input, kept readable in the traced graph.

A model that checks its input (timm's patch embedding: ``_assert(H == self.img_size[0], f"Input height ({H})
doesn't match model ({self.img_size[0]}).")``) is traced into a ``torch._assert`` node whose message was formatted
while tracing, so it reads ``Input height (Proxy(getitem_2))``. :func:`readable_checks` turns each such check on
sizes into a :func:`model_check` call that formats the message with the sizes of the input it is called with and
raises :class:`~fxfeat.errors.InputShapeError`; the dead-code pass keeps these checks when what they read is kept
(:func:`is_kept_check`).

Example:
    >>> import torch, torch.fx as fx
    >>> def forward(x):
    ...     torch._assert(x.shape[2] == 8, f"height {x.shape[2]} is not 8")
    ...     return x * 2
    >>> graph = fx.symbolic_trace(forward).graph
    >>> readable_checks(graph)
    1
    >>> module = fx.GraphModule({}, graph)
    >>> try:
    ...     module.forward(torch.ones(1, 1, 9, 9))
    ... except InputShapeError as error:
    ...     print(str(error).splitlines()[0])
    the model's own check of its input failed: height 9 is not 8
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from fxfeat.errors import InputShapeError
from fxfeat.trace.metadata import is_size_arithmetic

__all__ = ["is_kept_check", "model_check", "readable_checks"]

_PROXY = re.compile(r"Proxy\((\w+)\)")
_CONDITIONS = {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.and_,
               operator.or_, operator.not_, operator.truth}


def model_check(condition: bool, message: str, values: list[int]) -> None:
    """Raise :class:`~fxfeat.errors.InputShapeError` with ``message`` (each ``{}`` replaced by the next of
    ``values``) unless ``condition`` holds. TorchScript compiles it, with a ``RuntimeError``."""
    if not condition:
        parts = message.split("{}")
        text = parts[0]
        for i in range(len(values)):
            text += str(values[i]) + parts[i + 1]
        if not torch.jit.is_scripting():
            raise _check_error(text)
        raise RuntimeError("InputShapeError: " + text)


@torch.jit.unused
def _check_error(text: str) -> InputShapeError:
    return InputShapeError(f"the model's own check of its input failed: {text}",
                           hint="call the extractor with inputs of the size the model was built for (see its "
                           "input_size), or build the model for your size.")


def readable_checks(graph: fx.Graph) -> int:
    """Turn each ``torch._assert`` on sizes (a comparison) into a :func:`model_check` whose message shows the
    sizes it read where tracing wrote ``Proxy(...)``; sizes it did not compute from the input's shape are shown as
    ``?``. Returns how many were turned."""
    nodes = {node.name: node for node in graph.nodes}
    turned = 0
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target is torch._assert and len(node.args) == 2):
            continue
        condition, message = node.args
        if not (isinstance(condition, fx.Node) and condition.op == "call_function"
                and condition.target in _CONDITIONS and isinstance(message, str)):
            continue
        template, values = _template(message.replace("{}", "{ }"), nodes)
        with graph.inserting_before(node):
            check = graph.call_function(model_check, (condition, template, values))
        check.meta = dict(node.meta)
        node.replace_all_uses_with(check)
        graph.erase_node(node)
        turned += 1
    return turned


def _template(message: str, nodes: dict[str, fx.Node]) -> tuple[str, list[fx.Node]]:
    """``message`` with each ``Proxy(name)`` of a size replaced by ``{}`` (and of anything else by ``?``), and the
    size nodes in order."""
    values: list[fx.Node] = []

    def placeholder(match: re.Match) -> str:
        value = nodes.get(match.group(1))
        if value is not None and is_size_arithmetic(value) and not _is_whole_shape(value):
            values.append(value)
            return "{}"
        return "?"

    return _PROXY.sub(placeholder, message), values


def _is_whole_shape(node: fx.Node) -> bool:
    """``x.shape`` or ``x.size()``: a tuple of sizes, not one."""
    return (node.op == "call_function" and node.target is getattr
            or node.op == "call_method" and node.target == "size" and len(node.args) == 1 and not node.kwargs)


def is_kept_check(node: fx.Node, live: set[fx.Node]) -> bool:
    """Whether ``node`` is a check of the model's that the dead-code pass keeps: a ``torch._assert`` or
    :func:`model_check` reading only sizes of kept nodes (so it costs no computation the outputs do not need)."""
    if not (node.op == "call_function" and node.target in (torch._assert, model_check)):
        return False
    pending, seen = list(node.all_input_nodes), set()
    reads_kept = False
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in live:
            reads_kept = True
            continue
        if not (current.op == "call_function" and current.target in _CONDITIONS or is_size_arithmetic(current)):
            return False
        pending += current.all_input_nodes
    return reads_kept
