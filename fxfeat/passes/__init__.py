"""Stage 4 of the pipeline: rewrite passes over a copy of the traced graph, run by one driver."""

from fxfeat.passes.dead_code import remove_dead_code
from fxfeat.passes.driver import run_passes
from fxfeat.passes.expose_outputs import expose_outputs

__all__ = ["expose_outputs", "remove_dead_code", "run_passes"]
