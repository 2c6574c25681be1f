"""The request pipeline: the stages between admission and routing, and the one request path that the
gateway and the simulator both drive. Pure: no I/O, no clock reads, no asyncio."""

from fleetserve.pipeline.registry import STAGES, make_pipeline, make_stage, register_stage
from fleetserve.pipeline.session import Refused, RequestPath, RequestSession
from fleetserve.pipeline.stage import PROCEED, Answer, Hold, Outcome, Proceed, Refuse, Stage, Verdict

__all__ = [
    "PROCEED",
    "STAGES",
    "Answer",
    "Hold",
    "Outcome",
    "Proceed",
    "Refuse",
    "Refused",
    "RequestPath",
    "RequestSession",
    "Stage",
    "Verdict",
    "make_pipeline",
    "make_stage",
    "register_stage",
]
