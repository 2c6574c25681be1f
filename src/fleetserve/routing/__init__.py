"""Routing policies: pure functions of a request and a fleet snapshot, shared by gateway and simulator."""

from fleetserve.routing.base import (
    Decision,
    EngineView,
    FleetView,
    NoEngineAvailable,
    Policy,
    RejectRequest,
    RequestInfo,
    require_candidates,
)
from fleetserve.routing.registry import POLICIES, make_policy, register_policy

__all__ = [
    "POLICIES",
    "Decision",
    "EngineView",
    "FleetView",
    "NoEngineAvailable",
    "Policy",
    "RejectRequest",
    "RequestInfo",
    "make_policy",
    "register_policy",
    "require_candidates",
]
