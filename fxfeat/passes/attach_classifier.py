"""Pass: put a new linear classifier on the pooled features (timm's ``reset_classifier``), installed in the module."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxfeat.errors import RewriteError
from fxfeat.plan import ExtractionPlan
from fxfeat.plan.plan import NEW_CLASSIFIER

__all__ = ["attach_classifier"]


def attach_classifier(module: fx.GraphModule, plan: ExtractionPlan) -> int:
    """Insert ``new_classifier(pooled)`` when the plan asks for a new head, with a new ``nn.Linear`` on the
    module's device and in its dtype (one the module already holds there is kept: the train graph's rewrite
    shares the eval graph's); otherwise do nothing. Returns how many heads were attached."""
    if plan.classifier is None:
        return 0
    graph = module.graph
    pooled_name, in_features, num_classes = plan.classifier
    if not isinstance(getattr(module, NEW_CLASSIFIER, None), nn.Linear):
        like = next(module.parameters(), torch.empty(0))
        dtype = like.dtype if like.is_floating_point() else None
        module.add_submodule(NEW_CLASSIFIER, nn.Linear(in_features, num_classes, device=like.device, dtype=dtype))
    pooled = next(node for node in graph.nodes if node.name == pooled_name)
    with graph.inserting_after(pooled):
        node = graph.call_module(NEW_CLASSIFIER, (pooled,))
    if node.name != NEW_CLASSIFIER:
        raise RewriteError(
            f"the graph already has a node named {NEW_CLASSIFIER!r}", hint="this is a bug in fxfeat; please report it."
        )
    return 1
