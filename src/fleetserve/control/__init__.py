"""Control of the fleet's shape: the interface through which engines are started, drained and stopped,
the same for the live fleet and the simulated one. Pure: no I/O, no clock reads, no asyncio."""

from fleetserve.control.actuator import (
    CannotStart,
    EngineChange,
    EngineEvent,
    FleetActuator,
    FleetStep,
    UnknownEngine,
    UnknownGroup,
    next_engine_id,
    parse_fleet_script,
)

__all__ = [
    "CannotStart",
    "EngineChange",
    "EngineEvent",
    "FleetActuator",
    "FleetStep",
    "UnknownEngine",
    "UnknownGroup",
    "next_engine_id",
    "parse_fleet_script",
]
