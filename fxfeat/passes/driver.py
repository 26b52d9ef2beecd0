"""The one pass protocol and its driver: every rewrite, compile-time or inference, is a pass over a GraphModule.

A pass is a callable ``pass_(module) -> int``: it rewrites ``module.graph`` in place, owns the module edits its
rewrite needs (an edited copy of a layer, a new classifier, a oneDNN layer, installed in ``module``), and returns
how many things it changed. Compile-time passes read the plan, given with :func:`with_plan`. The driver runs a
list of passes in order, names the failing one in its error, and lints and recompiles once at the end (the
pattern of torch.fx's ``PassManager``).

Example:
    >>> import copy, torch.fx as fx, torchvision
    >>> from fxfeat.trace import trace_model
    >>> from fxfeat.analyse import analyse
    >>> from fxfeat.plan import make_plan, make_request
    >>> from fxfeat.passes import expose_outputs, remove_dead_code, run_passes, with_plan
    >>> model = torchvision.models.resnet18().eval()
    >>> request = make_request(model, out_indices=(0,))
    >>> traced = trace_model(model)
    >>> plan = make_plan(analyse(traced, request.input_size), request)
    >>> module = fx.GraphModule(traced.graph_module, copy.deepcopy(traced.graph))
    >>> run_passes(module, [with_plan(expose_outputs, plan), with_plan(remove_dead_code, plan)])
    {'expose_outputs': 1, 'remove_dead_code': 66}
    >>> [node.name for node in module.graph.nodes]
    ['x', 'conv1', 'bn1', 'relu', 'output']
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch.fx as fx

from fxfeat.errors import FxFeatError, RewriteError
from fxfeat.plan import ExtractionPlan

__all__ = ["Pass", "pass_name", "run_passes", "with_plan"]

Pass = Callable[[fx.GraphModule], int]


def with_plan(pass_: Callable[[fx.GraphModule, ExtractionPlan], int], plan: ExtractionPlan) -> Pass:
    """A compile-time pass bound to ``plan``."""
    return functools.partial(pass_, plan=plan)


def pass_name(pass_: Pass) -> str:
    return getattr(pass_, "__name__", None) or pass_name(pass_.func)


def run_passes(module: fx.GraphModule, passes: Sequence[Pass]) -> dict[str, int]:
    """Apply ``passes`` to ``module`` in order, then lint its graph and recompile it once. Returns what each pass
    changed, by name (a pass run twice: the sum).

    Raises:
        RewriteError: a pass failed or left an invalid graph; the message names the pass.
    """
    changed: dict[str, int] = {}
    for pass_ in passes:
        name = pass_name(pass_)
        try:
            changed[name] = changed.get(name, 0) + int(pass_(module) or 0)
        except FxFeatError:
            raise
        except Exception as error:
            raise RewriteError(
                f"Rewrite pass {name} failed: {type(error).__name__}: {error}",
                hint="this is a bug in fxfeat; please report it with the model and the arguments.",
            ) from error
    try:
        module.graph.lint()
    except Exception as error:
        raise RewriteError(
            f"The graph left by passes {[pass_name(p) for p in passes]} is invalid: {error}",
            hint="this is a bug in fxfeat; please report it with the model and the arguments.",
        ) from error
    module.recompile()
    return changed
