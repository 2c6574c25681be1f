"""The simulator's `FleetActuator`: engines that join and leave a run on the virtual clock.

A started engine is an engine model that is `starting` for its cold start (the group's `cold_start_s`,
else `CostModel.cold_start_s`: weights over the GPU's weight_load_gbps plus a fixed engine start), then
`ready`. A drained engine takes no new requests and is `gone` when its last request finishes, or is
stopped when the drain timeout runs out. A stopped engine's requests fail as `engine_stopped`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from fleetserve.config import FleetConfig
from fleetserve.control import (
    EngineChange,
    EngineEvent,
    FleetActuator,
    UnknownEngine,
    UnknownGroup,
    next_engine_id,
)
from fleetserve.model.cost import ENGINE_START_S
from fleetserve.sim.fleet import SimEngine, SimFleet


class SimulatedRun(Protocol):
    """What the actuator needs of the simulator (`Simulator` is one)."""

    config: FleetConfig
    fleet: SimFleet

    def at(self, when: float, action: Callable[[float], None]) -> None: ...
    def engine_added(self, engine: SimEngine) -> None: ...
    def engine_stopped(self, engine: SimEngine, now: float) -> None: ...


class SimActuator(FleetActuator):
    def __init__(self, simulator: SimulatedRun, drain_timeout_s: float) -> None:
        super().__init__()
        self._sim = simulator
        self._groups = {group.name: group for group in simulator.config.engines}
        self._drain_timeout_s = drain_timeout_s

    def start(self, group: str, now: float) -> str:
        spec = self._groups.get(group)
        if spec is None:
            raise UnknownGroup(
                f"no engine group {group!r} in the fleet file; groups: {', '.join(self._groups)}"
            )
        fleet = self._sim.fleet
        engine_id = next_engine_id(group, {engine.engine_id for engine in fleet.live()})
        engine = fleet.add(engine_id, spec, joined_at=now)
        if engine is None:
            raise UnknownGroup(f"engine group {group!r} cannot be simulated: {fleet.skipped[-1]}")
        self._sim.engine_added(engine)
        self._emit(EngineChange(engine_id, group, EngineEvent.STARTING, now))
        cold_start = spec.cold_start_s
        if cold_start is None:
            cold_start = engine.model.cost.cold_start_s(ENGINE_START_S)
        self._sim.at(now + cold_start, lambda when: self._ready(engine, when))
        return engine_id

    def _ready(self, engine: SimEngine, now: float) -> None:
        if engine.state is EngineEvent.STARTING:  # a drain or stop may have come first
            self._sim.fleet.set_state(engine, EngineEvent.READY, now)
            self._emit(EngineChange(engine.engine_id, engine.group.name, EngineEvent.READY, now))

    def drain(self, engine_id: str, now: float, timeout_s: float | None = None) -> None:
        engine = self._find(engine_id)
        if engine.state in (EngineEvent.DRAINING, EngineEvent.GONE):
            return
        self._sim.fleet.set_state(engine, EngineEvent.DRAINING, now)
        self._emit(EngineChange(engine_id, engine.group.name, EngineEvent.DRAINING, now))
        if engine.in_flight == 0:
            self._gone(engine, now)
            return
        timeout = self._drain_timeout_s if timeout_s is None else timeout_s
        self._sim.at(now + timeout, lambda when: self._drain_timed_out(engine, when))

    def drained(self, engine: SimEngine, now: float) -> None:
        """The simulator tells a draining engine's last request finished."""
        if engine.state is EngineEvent.DRAINING:
            self._gone(engine, now)

    def _drain_timed_out(self, engine: SimEngine, now: float) -> None:
        if engine.state is EngineEvent.DRAINING:
            self.stop(engine.engine_id, now)

    def stop(self, engine_id: str, now: float) -> None:
        engine = self._find(engine_id)
        if engine.state is EngineEvent.GONE:
            return
        self._sim.engine_stopped(engine, now)
        self._gone(engine, now)

    def manages(self, engine_id: str) -> bool:
        return any(engine.engine_id == engine_id for engine in self._sim.fleet.live())

    def _gone(self, engine: SimEngine, now: float) -> None:
        self._sim.fleet.set_state(engine, EngineEvent.GONE, now)
        self._emit(EngineChange(engine.engine_id, engine.group.name, EngineEvent.GONE, now))

    def _find(self, engine_id: str) -> SimEngine:
        for engine in self._sim.fleet.live():
            if engine.engine_id == engine_id:
                return engine
        raise UnknownEngine(f"no engine {engine_id!r} in the simulated fleet")
