"""Inference pass: trace into the norm layers that the tracer kept whole and that torch does not define.

The tracer keeps every batch or instance norm as one call, so that its own training flag decides how it
normalises. A library's norm subclass often computes more than the norm: timm's ``BatchNormAct2d`` is
``batch_norm -> drop -> act``. For inference its body is traced (eval mode, ``torch.nn`` modules as leaves) and
put in place of the call, so that the ``batch_norm`` can be folded into the layer before it and the activation
seen by the passes after. A norm whose body cannot be traced stays a call.

Example:
    >>> import timm, fxfeat
    >>> from fxfeat.optimize import inference_copy
    >>> module = inference_copy(fxfeat.compile(timm.create_model("efficientnet_b0"), out_indices=(0,)))
    >>> inline_norm_layers(module)     # the stem's and the first block's two BatchNormAct2d
    3
    >>> [node.target.__name__ for node in module.graph.nodes if node.op == "call_function"][-1:]
    ['batch_norm']
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxfeat.trace import ThreadConfinedTracer

__all__ = ["inline_norm_layers"]


def _defined_by_torch(layer: nn.Module) -> bool:
    return type(layer).__module__.startswith("torch.")


def _inline(module: fx.GraphModule, node: fx.Node, body: fx.Graph) -> None:
    """Copy ``body`` (the graph of the module ``node`` calls) in place of ``node``."""
    placeholders = [n for n in body.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, node.args))
    prefix = node.target + "."
    result = None
    with module.graph.inserting_before(node):
        for inner in body.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                result = fx.node.map_arg(inner.args[0], values.__getitem__)
                continue
            copied = module.graph.node_copy(inner, values.__getitem__)
            if inner.op in ("call_module", "get_attr"):
                copied.target = prefix + inner.target
            values[inner] = copied
    node.replace_all_uses_with(result)
    module.graph.erase_node(node)


def inline_norm_layers(module: fx.GraphModule) -> int:
    """Inline every norm layer of ``module`` defined outside torch whose body traces (see the module docstring);
    ``module`` is changed in place. Returns how many calls were inlined."""
    inlined = 0
    for node in list(module.graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        layer = module.get_submodule(node.target)
        if not isinstance(layer, nn.modules.batchnorm._NormBase) or _defined_by_torch(layer) or layer.training:
            continue
        try:
            body = ThreadConfinedTracer().trace(layer)  # one thread at a time, as every trace (trace/lock.py)
        except Exception:  # anything the tracer cannot follow keeps the call
            continue
        placeholders = [n for n in body.nodes if n.op == "placeholder"]
        output = next(n for n in body.nodes if n.op == "output")
        if len(placeholders) != len(node.args) or not isinstance(output.args[0], fx.Node):
            continue
        _inline(module, node, body)
        inlined += 1
    return inlined
