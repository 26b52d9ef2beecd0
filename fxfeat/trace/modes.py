"""The trace stage as :func:`fxfeat.compile` runs it: the eval-mode graph, the train-mode graph with the eval
graph's node names, and the input size the model takes.

The size is the one the caller gives, else the one the model declares, corrected where the graph's first
convolution takes another number of channels and fails at the declared one
(:func:`~fxfeat.trace.probe.resolved_input_size`); a graph traced through shape-dependent Python is traced again
at the corrected size. Everything later works at :attr:`TracedModes.input_size` and never goes back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.Dropout(0.5), nn.ReLU()).eval()
    >>> modes = trace_modes(model, (3, 64, 64), size_given=False)
    >>> modes.input_size
    (1, 64, 64)
    >>> train_graph, _ = modes.training
    >>> [node.name for node in train_graph.nodes if node.op == "call_module"]
    ['_0', '_1', '_2']
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from fxfeat.trace.align import align_training_graph
from fxfeat.trace.lock import trace_lock
from fxfeat.trace.probe import resolved_input_size
from fxfeat.trace.tracer import TracedModel, graph_targets, trace_model, trace_training_graph

__all__ = ["TracedModes", "trace_modes"]


@dataclass(frozen=True)
class TracedModes:
    """What the trace stage hands on.

    Attributes:
        traced: the model traced in eval mode; the analyses and the plan name its nodes.
        training: the graph traced in train mode with the eval graph's node names
            (:func:`~fxfeat.trace.align.align_training_graph`) and what its targets name; or, where that failed,
            why (the extractor then runs the eval graph in both modes, with a warning); ``None`` where not asked
            for (:func:`fxfeat.inspect` needs the eval graph only).
        input_size: the (C, H, W) the model takes.
    """

    traced: TracedModel
    training: tuple[fx.Graph, dict[str, object]] | Exception | None
    input_size: tuple[int, int, int]


@trace_lock()
def trace_modes(model: nn.Module, input_size: tuple[int, int, int], size_given: bool, train_mode: bool = True,
                ) -> TracedModes:
    """Trace ``model`` (in eval mode) in eval mode and, with ``train_mode``, in train mode, and resolve its input
    size: ``input_size`` as given (``size_given``), or the declared one checked against the graph's first
    convolution."""
    traced = trace_model(model, example_size=input_size)
    if not size_given:
        resolved = resolved_input_size(traced.graph_module, input_size)
        if resolved != input_size and traced.example is not None:  # its Python ran on an example of that size
            traced = trace_model(model, example_size=resolved)
        input_size = resolved
    return TracedModes(traced, _training_graph(traced) if train_mode else None, tuple(input_size))


def _training_graph(traced: TracedModel) -> tuple[fx.Graph, dict[str, object]] | Exception:
    try:
        raw, raw_targets = trace_training_graph(traced)
        return align_training_graph(traced.graph, graph_targets(traced.graph, traced.graph_module), raw, raw_targets)
    except Exception as error:
        return error
