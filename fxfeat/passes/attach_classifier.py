"""Pass: put a new linear classifier (created when the module is built) on the pooled features."""

from __future__ import annotations

from torch import fx

from fxfeat.errors import RewriteError
from fxfeat.plan import ExtractionPlan
from fxfeat.plan.plan import NEW_CLASSIFIER

__all__ = ["attach_classifier"]


def attach_classifier(graph: fx.Graph, plan: ExtractionPlan) -> None:
    """Insert ``new_classifier(pooled)`` when the plan asks for a new head; otherwise do nothing."""
    if plan.classifier is None:
        return
    pooled_name = plan.classifier[0]
    pooled = next(node for node in graph.nodes if node.name == pooled_name)
    with graph.inserting_after(pooled):
        node = graph.call_module(NEW_CLASSIFIER, (pooled,))
    if node.name != NEW_CLASSIFIER:
        raise RewriteError(
            f"the graph already has a node named {NEW_CLASSIFIER!r}", hint="this is a bug in fxfeat; please report it."
        )
