"""Run rewrite passes over a copy of the traced graph; name the failing pass in errors.

A pass is a function ``pass_(graph, plan) -> None`` that rewrites ``graph`` in place. The driver copies the
traced graph once, runs the passes in order, and lints the result once.

Example:
    >>> import torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> from fxfeat.plan import make_plan, make_request
    >>> from fxfeat.passes import expose_outputs, remove_dead_code, run_passes
    >>> model = torchvision.models.resnet18().eval()
    >>> request = make_request(model, out_indices=(0,))
    >>> traced = trace_model(model)
    >>> plan = make_plan(analyse(traced, request.input_size), request)
    >>> graph = run_passes(traced.graph, plan, [expose_outputs, remove_dead_code])
    >>> [node.name for node in graph.nodes]
    ['x', 'conv1', 'bn1', 'relu', 'output']
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch.fx as fx

from fxfeat.errors import FxFeatError, RewriteError
from fxfeat.plan import ExtractionPlan

__all__ = ["Pass", "run_passes"]

Pass = Callable[[fx.Graph, ExtractionPlan], None]


def run_passes(graph: fx.Graph, plan: ExtractionPlan, passes: Sequence[Pass]) -> fx.Graph:
    """Apply ``passes`` in order to a copy of ``graph`` and return the linted copy.

    Raises:
        RewriteError: a pass failed or left an invalid graph; the message names the pass.
    """
    rewritten = copy.deepcopy(graph)
    for pass_ in passes:
        try:
            pass_(rewritten, plan)
        except FxFeatError:
            raise
        except Exception as error:
            raise RewriteError(
                f"Rewrite pass {pass_.__name__} failed: {type(error).__name__}: {error}",
                hint="this is a bug in fxfeat; please report it with the model and the arguments.",
            ) from error
    try:
        rewritten.lint()
    except Exception as error:
        raise RewriteError(
            f"The graph left by passes {[p.__name__ for p in passes]} is invalid: {error}",
            hint="this is a bug in fxfeat; please report it with the model and the arguments.",
        ) from error
    return rewritten
