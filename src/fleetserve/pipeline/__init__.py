"""The request pipeline: the stages between admission and routing, and the one request path that the
gateway and the simulator both drive. Pure: no I/O, no clock reads, no asyncio. Stages by name (the
fleet file's `pipeline:`) are built by `fleetserve.pipeline.registry`, which knows the stages of other
rooms too (the tenants room's `vtc`), so it is imported on its own rather than from here."""

from fleetserve.pipeline.session import Refused, RequestPath, RequestSession
from fleetserve.pipeline.stage import PROCEED, Answer, Hold, Outcome, Proceed, Refuse, Stage, Verdict

__all__ = [
    "PROCEED",
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
]
