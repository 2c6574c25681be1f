"""Autoscaling in the simulator: the fleet's `FleetAutoscaler` (the object the gateway runs), its metric
read from the engine models, acting through the simulator's `FleetActuator`: started engines come up
after their cold start, shed ones drain (their requests finish) or, still starting, stop."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fleetserve.autoscale.loop import (
    TYPICAL_PROMPT_TOKENS,
    FleetAutoscaler,
    MetricSource,
)
from fleetserve.autoscale.mix import GpuOption
from fleetserve.config import FleetConfig
from fleetserve.control import FleetActuator
from fleetserve.control.members import FleetMembers
from fleetserve.pipeline import RequestPath
from fleetserve.sim.errors import SimInputError
from fleetserve.sim.fleet import SimEngine, SimFleet


class SimReadings:
    """An engine's autoscaling readings from its engine model, brought up to `now` first."""

    def __init__(self, fleet: SimFleet, current: Callable[[SimEngine, float], None]) -> None:
        self._fleet = fleet
        self._current = current
        self._by_id: dict[str, SimEngine] = {}

    def _engine(self, engine_id: str) -> SimEngine:
        engine = self._by_id.get(engine_id)
        if engine is None:
            self._by_id = {engine.engine_id: engine for engine in self._fleet.live()}
            engine = self._by_id[engine_id]
        return engine

    def in_flight(self, engine_id: str) -> int:
        return self._engine(engine_id).in_flight

    def reading(self, engine_id: str, name: str, now: float) -> float:
        engine = self._engine(engine_id)
        self._current(engine, now)
        if name == "in_flight":
            return engine.in_flight / engine.view.capacity
        if name == "waiting":
            return engine.model.metrics.num_waiting
        if name == "kv_usage":
            return engine.model.metrics.kv_usage
        if name == "output_tokens":
            return engine.output_tokens
        return engine.model.predict_ttft(TYPICAL_PROMPT_TOKENS, 0, now) * 1000.0


def sim_autoscaler(
    config: FleetConfig,
    fleet: SimFleet,
    actuator: FleetActuator,
    path: RequestPath,
    start: float,
    current: Callable[[SimEngine, float], None],
    demand: Callable[[str], int] | None = None,
    source: MetricSource | None = None,
    planned_options: Mapping[str, GpuOption] | None = None,
) -> FleetAutoscaler | None:
    """The run's autoscaler, None when no group autoscales. `current` brings an engine model up to `now`
    before its metrics are read; `source` replaces the engine models' metrics (a scripted one, say);
    `planned_options`: the planned groups' profiles (`sim.profiles.planned_options`)."""
    if config.planned_groups() and planned_options is None:
        raise SimInputError(
            "planned autoscaling needs each planned group's GPU profile: `fleetserve sim` measures them;"
            " from Python, pass SimOptions(planned_options=sim.profiles.planned_options(...))"
        )
    groups = config.autoscaled_groups(planned_options, start)
    if not groups:
        return None
    members = FleetMembers()
    for engine in fleet.live():
        members.adopt(engine.engine_id, engine.group.name, start)
    actuator.subscribe(members.record)
    autoscaler = FleetAutoscaler(
        groups, actuator, members, SimReadings(fleet, current), start, demand, source
    )
    autoscaler.follow(path)
    return autoscaler
