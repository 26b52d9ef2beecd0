"""Plan the ``output_stride`` rewrite: which convolutions and poolings lose stride or gain dilation.

Everything follows from the reductions the analysis measured. With ``os`` the requested output stride, an op
whose input has reduction ``r_in`` and output ``r_out``:

- keeps ``min(r_out, os) / min(r_in, os)`` of its stride: ops past the requested stride lose theirs;
- multiplies its dilation by ``max(1, r_in / os)``: the first op after a removed stride (the strided op
  itself) keeps the previous dilation and every later one takes the new one, as timm's ``output_stride``
  and torchvision's ``replace_stride_with_dilation`` do;
- gets padding that keeps its size behaviour: a de-strided op pads "same" for stride 1
  (``dilation * (kernel - 1)`` in total), any other op adds ``(new - old dilation) * (kernel - 1)``. An odd total
  is padded explicitly, one more at the bottom/right (timm's dynamic "same" padding), with zeros, or ``-inf``
  for max pooling. So a non-overlapping pool (kernel == stride) becomes a stride-1 pool that keeps the size.

Average pooling has no dilation in PyTorch; it is left undilated, as timm leaves its average-pool shortcut.
Convolution subclasses with a ``forward`` of their own (timm's ``Conv2dSame``) compute their padding at run
time from ``stride`` and ``dilation``: only those two are changed. Any other op that lowers the resolution past
the requested stride (a strided slice, a reshape into patches) cannot be rewritten and raises an error.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> from fxfeat.plan.output_stride import plan_output_stride
    >>> analysis = analyse(trace_model(torchvision.models.resnet50().eval()), (3, 224, 224))
    >>> edits = plan_output_stride(analysis, 16)
    >>> [(e.node, e.stride, e.dilation, e.padding) for e in edits if e.node.startswith("layer4_1")]
    [('layer4_1_conv2', (1, 1), (2, 2), (2, 2))]
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch.nn.functional as F
from torch import fx, nn

from fxfeat.errors import OutputStrideError
from fxfeat.trace import describe_node
from fxfeat.trace.metadata import output_node

__all__ = ["FUNCTION_ARGS", "OpEdit", "edited_module", "plan_output_stride"]

_MODULE_KINDS = {nn.Conv2d: "conv", nn.MaxPool2d: "max_pool", nn.AvgPool2d: "avg_pool"}
_FUNCTION_KINDS = {F.conv2d: "conv", F.max_pool2d: "max_pool", F.avg_pool2d: "avg_pool"}
# Positional indices of the arguments in the functional signatures (an op lacking one, avg_pool's dilation,
# has no entry).
FUNCTION_ARGS = {
    "conv": {"stride": 3, "padding": 4, "dilation": 5},
    "max_pool": {"kernel_size": 1, "stride": 2, "padding": 3, "dilation": 4},
    "avg_pool": {"kernel_size": 1, "stride": 2, "padding": 3},
}


@dataclass(frozen=True)
class OpEdit:
    """New settings of one convolution or pooling.

    Attributes:
        node: the fx node of the op.
        target: module path for ``call_module`` ops, ``None`` for functional ones.
        kind: ``"conv"``, ``"max_pool"``, ``"avg_pool"``, or ``"module"`` for an opaque module.
        stride, dilation, padding: the new values (height, width).
        explicit_pad: ``(left, right, top, bottom)`` padding to apply before the op, or ``None``.
        pad_value: the value ``explicit_pad`` pads with.
        runtime_padding: the op computes its own padding at run time; ``padding`` is left as it was.
        inner: for an opaque module (``kind="module"``), the edits of the layers inside it, ``target`` being
            their path inside the module.
    """

    node: str
    target: str | None
    kind: str
    stride: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    explicit_pad: tuple[int, int, int, int] | None = None
    pad_value: float = 0.0
    runtime_padding: bool = False
    inner: tuple[OpEdit, ...] = ()


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _describe_op(node: fx.Node, root: nn.Module, shapes) -> tuple[str | None, dict] | None:
    """Kind and current settings of a convolution/pooling node, or None for any other op."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        base = next((base for base in _MODULE_KINDS if isinstance(module, base)), None)
        if base is None:
            return None
        return _MODULE_KINDS[base], dict(
            kernel=module.kernel_size, stride=module.stride, dilation=getattr(module, "dilation", 1),
            padding=module.padding, custom=type(module).forward is not base.forward,
            padding_mode=getattr(module, "padding_mode", "zeros"),
        )
    if node.op == "call_function" and node.target in _FUNCTION_KINDS:
        kind = _FUNCTION_KINDS[node.target]
        positions = FUNCTION_ARGS[kind]

        def argument(name, default):
            position = positions.get(name)
            if name in node.kwargs:
                return node.kwargs[name]
            if position is not None and position < len(node.args):
                return node.args[position]
            return default

        if kind == "conv":
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            known = shapes.get(weight.name) if isinstance(weight, fx.Node) else None
            kernel = tuple(known.shape[-2:]) if known is not None else None
        else:
            kernel = argument("kernel_size", None)
        stride = argument("stride", 1 if kind == "conv" else None) or kernel
        return kind, dict(kernel=kernel, stride=stride, dilation=argument("dilation", 1),
                          padding=argument("padding", 0), custom=False, padding_mode="zeros")
    return None


def plan_output_stride(analysis, output_stride: int | None) -> tuple[OpEdit, ...]:
    """The edits that bring the model's output stride down to ``output_stride`` (none if it already is).

    Raises:
        OutputStrideError: an op lowering the resolution past ``output_stride`` cannot be rewritten.
    """
    if output_stride is None:
        return ()
    traced, shapes = analysis.traced, analysis.shapes
    edits = []
    for node in traced.graph.nodes:
        out_shape = shapes.get(node.name)
        if out_shape is None or not out_shape.is_map:
            continue
        r_in = _input_reduction(node, shapes)
        if r_in is None:
            continue
        r_out = out_shape.reduction
        factor = (r_out // r_in) // max(1, min(r_out, output_stride) // min(r_in, output_stride))
        multiplier = max(1, r_in // output_stride)
        if factor == 1 and multiplier == 1:
            continue
        described = _describe_op(node, traced.root, shapes)
        if described is None:
            if factor > 1:
                raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
            if node.op == "call_module":  # an opaque module: the kernels it holds run dilated
                edit = _opaque_module_edit(node, traced, shapes, multiplier, r_in, r_out, output_stride)
                if edit is not None:
                    edits.append(edit)
            continue  # an op without stride or kernel (activation, norm, add...) needs no change
        kind, current = described
        edit = _edit(node, kind, current, factor, multiplier, r_in, r_out, output_stride, traced)
        if edit is not None:
            edits.append(edit)
    _check_shared_modules(edits, traced)
    return tuple(edits)


def _opaque_module_edit(node, traced, shapes, multiplier, r_in, r_out, output_stride) -> OpEdit | None:
    """Dilation of the convolutions and max poolings inside a module kept opaque (torch.fx could not trace it),
    which runs at one reduction: each kernel larger than 1 is dilated as if it were in the graph."""
    module = traced.root.get_submodule(node.target)
    inner = []
    for path, child in module.named_modules():
        base = next((base for base in (nn.Conv2d, nn.MaxPool2d) if isinstance(child, base)), None)
        if base is None or not path:
            continue
        kernel, stride = _pair(child.kernel_size), _pair(child.stride)
        if max(kernel) == 1:
            continue
        if stride != (1, 1):  # it lowers the resolution inside and raises it again: no dilation reproduces that
            raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
        current = dict(kernel=kernel, stride=stride, dilation=_pair(getattr(child, "dilation", 1)),
                       padding=child.padding, custom=type(child).forward is not base.forward,
                       padding_mode=getattr(child, "padding_mode", "zeros"))
        edit = _edit(node, _MODULE_KINDS[base], current, 1, multiplier, r_in, r_out, output_stride, traced)
        if edit is not None:
            if edit.explicit_pad is not None:  # no graph node to pad before: only symmetric padding works
                raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
            inner.append(dataclasses.replace(edit, target=path))
    if not inner:
        return None
    return OpEdit(node.name, node.target, "module", (1, 1), (1, 1), (0, 0), inner=tuple(inner))


def _input_reduction(node: fx.Node, shapes) -> int | None:
    """Largest reduction among the nearest feature maps the node is computed from."""
    reductions, frontier, seen = [], list(node.all_input_nodes), set()
    while frontier:
        current = frontier.pop()
        if current.name in seen:
            continue
        seen.add(current.name)
        shape = shapes.get(current.name)
        if shape is not None and shape.is_map:
            reductions.append(shape.reduction)
        elif current.op not in ("get_attr", "placeholder"):
            frontier.extend(current.all_input_nodes)
    return max(reductions) if reductions else None


def _edit(node, kind, current, factor, multiplier, r_in, r_out, output_stride, traced) -> OpEdit | None:
    if current["kernel"] is None:
        raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
    kernel, stride = _pair(current["kernel"]), _pair(current["stride"])
    dilation = _pair(current["dilation"])
    if any(s % factor for s in stride):
        raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
    new_stride = tuple(s // factor for s in stride)
    if kind == "avg_pool":
        new_dilation = dilation
    else:  # a 1x1 op keeps dilation 1: same result, but other kernels could sum in another order
        new_dilation = tuple(d * multiplier if k > 1 else d for d, k in zip(dilation, kernel))
    if new_stride == stride and new_dilation == dilation:
        return None  # a 1x1 op, or an average pooling that cannot be dilated
    target = node.target if node.op == "call_module" else None
    if current["custom"]:
        if kind != "conv" or node.op != "call_module":
            raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
        return OpEdit(node.name, target, kind, new_stride, new_dilation, _pair(0), runtime_padding=True)
    padding = current["padding"]
    if isinstance(padding, str):
        padding = (0, 0) if padding == "valid" else None
    if padding is None:  # padding="same" on a stride-1 conv adapts to the dilation by itself
        return OpEdit(node.name, target, kind, new_stride, new_dilation, _pair(0), runtime_padding=True)
    padding = _pair(padding)
    totals = []
    for k, p, d_old, d_new, s in zip(kernel, padding, dilation, new_dilation, new_stride):
        if factor > 1 and s == 1:
            totals.append(d_new * (k - 1))  # "same" for stride 1
        else:
            totals.append(2 * p + (d_new - d_old) * (k - 1))
    # PyTorch's max pooling takes at most half its kernel as padding; a dilated one needs more, padded explicitly.
    fits = kind != "max_pool" or all(total // 2 <= k // 2 for total, k in zip(totals, kernel))
    if fits and all(total % 2 == 0 for total in totals):
        return OpEdit(node.name, target, kind, new_stride, new_dilation, tuple(t // 2 for t in totals))
    if current["padding_mode"] != "zeros":
        raise _cannot_rewrite(node, traced, r_in, r_out, output_stride)
    total_h, total_w = totals
    explicit = (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
    pad_value = float("-inf") if kind == "max_pool" else 0.0
    return OpEdit(node.name, target, kind, new_stride, new_dilation, (0, 0), explicit, pad_value)


def _cannot_rewrite(node: fx.Node, traced, r_in: int, r_out: int, output_stride: int) -> OutputStrideError:
    stack = traced.node_calls.get(node.name, ())
    module = traced.calls[stack[-1]].path if stack and stack[-1] in traced.calls else "the model's forward"
    return OutputStrideError(
        f"output_stride={output_stride} needs {describe_node(node)[:-1]}, in {module}) to stop lowering the "
        f"resolution from reduction {r_in} to {r_out}, but only strided convolutions and poolings can be "
        "rewritten to dilation.",
        hint=f"use output_stride={r_out} or more, or output_stride=None.",
    )


def _check_shared_modules(edits: list[OpEdit], traced) -> None:
    by_target: dict[str, OpEdit] = {}
    for edit in edits:
        if edit.target is None:
            continue
        previous = by_target.setdefault(edit.target, edit)
        same = (previous.stride, previous.dilation, previous.padding, previous.explicit_pad) == (
            edit.stride, edit.dilation, edit.padding, edit.explicit_pad)
        if not same:
            raise OutputStrideError(
                f"module {edit.target!r} is called at several resolutions that need different settings "
                f"(nodes {previous.node!r} and {edit.node!r}).",
                hint="use a larger output_stride, or output_stride=None.",
            )


def edited_module(module: nn.Module, edit: OpEdit) -> nn.Module:
    """A shallow copy of ``module`` with the edit's stride, dilation and padding (the original is untouched);
    for an opaque module, a shallow copy whose edited layers (and the modules holding them) are copies."""
    if edit.kind == "module":
        return _with_edited_layers(module, edit.inner)
    copy_ = copy.copy(module)
    copy_.stride = edit.stride
    if edit.kind != "avg_pool":
        copy_.dilation = edit.dilation
    if not edit.runtime_padding:
        copy_.padding = edit.padding
        if hasattr(copy_, "_reversed_padding_repeated_twice"):
            copy_._reversed_padding_repeated_twice = [p for p in reversed(edit.padding) for _ in range(2)]
    return copy_


def _with_edited_layers(module: nn.Module, inner: tuple[OpEdit, ...]) -> nn.Module:
    root = copy.copy(module)
    root._modules = dict(root._modules)
    for edit in inner:
        *path, name = edit.target.split(".")
        parent = root
        for part in path:
            child = copy.copy(parent._modules[part])
            child._modules = dict(child._modules)
            parent._modules[part] = child
            parent = child
        parent._modules[name] = edited_module(parent._modules[name], edit)
    return root


def check_output_stride(extractor: fx.GraphModule, plan, input_size) -> list[tuple[int, ...]]:
    """Run the rewritten extractor on the probes and check every returned map has its planned reduction.

    Returns:
        The per-sample shape of each returned tensor at the probe size.

    Raises:
        OutputStrideError: the rewritten model fails on the probes (position embeddings or reshapes tied to the
            grid size...) or a returned map does not have the planned reduction.
    """
    from fxfeat.analyse.shapes import propagate_shapes
    from fxfeat.errors import ShapePropagationError

    try:
        shapes = propagate_shapes(extractor, input_size)
    except ShapePropagationError as error:
        failing = describe_node(error.node) if error.node is not None else "a node"
        raise OutputStrideError(
            f"With output_stride={plan.output_stride} the model no longer runs: {failing} fails with "
            f"{type(error.cause).__name__}: {error.cause}".strip(),
            hint="the model ties sizes to its native grid (position embeddings, fixed reshapes, windows); "
            "use output_stride=None.",
        ) from error
    output = output_node(extractor.graph)
    returned = output.args[0]
    names = [n.name for n in (returned.values() if isinstance(returned, dict) else
                              returned if isinstance(returned, (list, tuple)) else [returned])]
    result = []
    for index, name in zip(plan.out_indices, names):
        shape, expected = shapes.get(name), plan.levels[index].reduction
        if shape is not None and shape.is_map and expected is not None and shape.reduction != expected:
            raise OutputStrideError(
                f"With output_stride={plan.output_stride}, output {index} ({name}) has reduction "
                f"{shape.reduction} instead of {expected}.",
                hint="the model lowers the resolution in a way fxfeat cannot rewrite; use output_stride=None.",
            )
        result.append(shape.shape if shape is not None else ())
    return result
