"""When the fleet is full for a model, as the queueing stages judge it: the requests they let through
and have not seen finish reach `slots_per_engine` for each healthy, ready engine of the model, times the
engine's relative capacity (an H100 counts for as many L4s as it is faster, which llm-d's saturation
detector, averaging engines as equals, does not)."""

from __future__ import annotations

import math

from fleetserve.routing.base import FleetView


def fleet_slots(model: str, view: FleetView, slots_per_engine: int) -> int:
    """How many requests of `model` the fleet takes before requests wait."""
    capacity = sum(
        engine.capacity
        for engine in view.engines.values()
        if engine.model == model and engine.healthy and engine.ready
    )
    return math.floor(slots_per_engine * capacity)
