"""Stage 3 of the pipeline: check the user's request and turn it into an :class:`ExtractionPlan`."""

from fxfeat.plan.plan import ExtractionPlan, PlannedOutput, make_plan
from fxfeat.plan.request import Request, make_request

__all__ = ["ExtractionPlan", "PlannedOutput", "Request", "make_plan", "make_request"]
