"""Stage 1 of the pipeline: trace a model with ``torch.fx``, recording which module call made each node; for
:func:`fxfeat.compile`, in both modes and with the input size the model takes (:mod:`fxfeat.trace.modes`). Threads
trace one at a time, under :func:`trace_lock` (:mod:`fxfeat.trace.lock`)."""

from fxfeat.trace.lock import ThreadConfinedTracer, trace_lock
from fxfeat.trace.modes import TracedModes, trace_modes
from fxfeat.trace.state import eager_model, evaluation_mode, model_state_kept
from fxfeat.trace.tracer import (
    ModuleCall,
    TracedModel,
    describe_node,
    graph_targets,
    trace_model,
    trace_training_graph,
)
from fxfeat.trace.values import DEFAULT_INPUT_SIZE

__all__ = [
    "DEFAULT_INPUT_SIZE", "ModuleCall", "ThreadConfinedTracer", "TracedModel", "TracedModes", "describe_node",
    "eager_model", "evaluation_mode", "graph_targets", "model_state_kept", "trace_lock", "trace_model", "trace_modes",
    "trace_training_graph",
]
