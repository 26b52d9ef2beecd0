"""Stage 1 of the pipeline: trace a model with ``torch.fx``, recording which module call made each node."""

from fxfeat.trace.state import eager_model, evaluation_mode, model_state_kept
from fxfeat.trace.tracer import ModuleCall, TracedModel, describe_node, trace_model, trace_training_graph
from fxfeat.trace.values import DEFAULT_INPUT_SIZE

__all__ = [
    "DEFAULT_INPUT_SIZE", "ModuleCall", "TracedModel", "describe_node", "eager_model", "evaluation_mode",
    "model_state_kept", "trace_model", "trace_training_graph",
]
