"""Pass: give every input after the image the value a caller passing only the image gives it.

A traced ``forward(self, x, attn_mask=None, is_causal=False, **kwargs)`` keeps its optional arguments as graph
inputs. An extractor takes one image, so each optional input is replaced, in the nodes that read it, by its
default (``**kwargs`` by ``{}``, ``*args`` by ``()``) and removed from the signature. The constants then reach
the ops as Python values, as in the eager call: TorchScript sees ``is_causal`` as a ``bool`` rather than an
untyped argument, and ONNX exporters get no extra inputs. A required extra input is left as it is.

Example:
    >>> import torch
    >>> import torch.fx as fx
    >>> graph = fx.Graph()
    >>> x, flag = graph.placeholder("x"), graph.placeholder("scale", default_value=2.0)
    >>> _ = graph.output(graph.call_function(torch.mul, (x, flag)))
    >>> module = fx.GraphModule({}, graph)
    >>> bind_optional_inputs(module)
    1
    >>> print([(node.op, node.args) for node in module.graph.nodes])
    [('placeholder', ()), ('call_function', (x, 2.0)), ('output', (mul,))]
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx

from fxfeat.plan import ExtractionPlan

__all__ = ["bind_optional_inputs"]


def _value_when_omitted(node: fx.Node):
    """The value a caller passing only the image gives placeholder ``node`` (``inspect.Parameter.empty`` if
    it is required)."""
    target = str(node.target)
    if target.startswith("**"):
        return {}
    if target.startswith("*"):
        return ()
    return node.args[0] if node.args else inspect.Parameter.empty


def bind_optional_inputs(module: fx.GraphModule, plan: ExtractionPlan | None = None) -> int:
    """Replace every optional placeholder after the first (the image) by its default, and remove it; annotate
    the image as a tensor (a model taking ``x: Union[Tensor, Dict[str, Tensor]]`` gets an image here, and
    TorchScript reads the annotation). Returns how many were bound."""
    graph, bound = module.graph, 0
    image, *placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    image.type = torch.Tensor
    for placeholder in placeholders:
        value = _value_when_omitted(placeholder)
        if value is inspect.Parameter.empty:
            continue
        for user in list(placeholder.users):
            user.args = fx.node.map_arg(user.args, lambda node, p=placeholder, v=value: v if node is p else node)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda node, p=placeholder, v=value: v if node is p else node)
        graph.erase_node(placeholder)
        bound += 1
    return bound
