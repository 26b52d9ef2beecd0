"""Stage 4 of the pipeline: rewrite passes over a GraphModule, one protocol and one driver (:mod:`.driver`).

The compile-time passes below read the plan (:func:`with_plan`); the inference passes beside them
(``inline_norms``, ``remove_no_ops``, ``fold_batch_norm``, ``in_place``, ``fuse_onednn``, with helpers in
``graph_edits``) are run by :func:`fxfeat.optimize_for_inference` through the same driver.
"""

from fxfeat.passes.attach_classifier import attach_classifier
from fxfeat.passes.bind_inputs import bind_optional_inputs
from fxfeat.passes.dead_code import remove_dead_code
from fxfeat.passes.dilate import dilate
from fxfeat.passes.driver import run_passes, with_plan
from fxfeat.passes.expose_outputs import expose_outputs
from fxfeat.passes.replay_head import replay_head
from fxfeat.passes.snapshot_outputs import snapshot_outputs

__all__ = [
    "attach_classifier", "bind_optional_inputs", "dilate", "expose_outputs", "remove_dead_code", "replay_head",
    "run_passes", "snapshot_outputs", "with_plan",
]
