"""Autoscaling in the simulator: every group with an `autoscale:` block gets the `GroupScaler` its
configuration builds (the one the gateway would run), fed the group's metric from the engine models every
`interval_s` of virtual time, and acting through the simulator's `FleetActuator`: started engines come up
after their cold start, shed ones drain (their requests finish) or, still starting, stop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fleetserve.autoscale import GroupScaler, Replica, ScaleActions
from fleetserve.autoscale.scaler import ReplicaState
from fleetserve.config import EngineGroup
from fleetserve.control import EngineChange, EngineEvent, FleetActuator
from fleetserve.sim.fleet import SimEngine, SimFleet

TYPICAL_PROMPT_TOKENS = 1024  # the prompt whose predicted TTFT the predicted_ttft_ms metric reads
STATES: dict[EngineEvent, ReplicaState] = {
    EngineEvent.STARTING: "starting",
    EngineEvent.READY: "ready",
    EngineEvent.DRAINING: "draining",
}


@dataclass
class _Group:
    metric: str
    replicas: int  # at the start
    interval_s: float
    scaler: GroupScaler
    next_round: float


@dataclass
class SimAutoscaling:
    fleet: SimFleet
    actuator: FleetActuator
    start: float  # the run's first second: scale events are reported from it
    # brings an engine model up to `now` before its metrics are read
    current: Callable[[SimEngine, float], None]
    groups: dict[str, _Group] = field(default_factory=dict)
    scale_events: list[dict[str, Any]] = field(default_factory=list)
    cold_starts: int = 0
    never_ready: int = 0
    _since: dict[str, float] = field(default_factory=dict)  # engine id -> when it entered its state
    # engine id -> (when, output tokens) at its last tokens_per_s sample
    _tokens_seen: dict[str, tuple[float, int]] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        groups: list[EngineGroup],
        fleet: SimFleet,
        actuator: FleetActuator,
        start: float,
        current: Callable[[SimEngine, float], None],
    ) -> SimAutoscaling | None:
        """None when no group autoscales."""
        scaled = {
            group.name: _Group(
                scale.metric, group.replicas, scale.interval_s, scale.scaler(group.name), start
            )
            for group in groups
            if (scale := group.autoscale) is not None
        }
        if not scaled:
            return None
        autoscaling = cls(fleet, actuator, start, current, scaled)
        actuator.subscribe(autoscaling._changed)
        return autoscaling

    def due(self) -> float:
        return min(group.next_round for group in self.groups.values())

    def run(self, now: float) -> None:
        """Every group whose round is due samples its metric and acts on its scaler's decision."""
        for name, group in self.groups.items():
            if group.next_round > now:
                continue
            group.next_round = now + group.interval_s
            engines = [e for e in self.fleet.live() if e.group.name == name]
            ready = [engine for engine in engines if engine.state is EngineEvent.READY]
            if ready:
                group.scaler.observe(now, self._metric(group.metric, ready, now))
            replicas = [
                Replica(e.engine_id, STATES[e.state], self._since.get(e.engine_id, self.start), e.in_flight)
                for e in engines
            ]
            self._act(name, group.scaler.step(replicas, now), now)

    def summary(self) -> dict[str, Any]:
        return {
            "autoscale": {
                name: {
                    "policy": group.scaler.autoscaler.name,
                    "metric": group.metric,
                    "replicas_at_start": group.replicas,
                }
                for name, group in self.groups.items()
            },
            "cold_starts": self.cold_starts,
            "never_ready": self.never_ready,
            "scale_events": self.scale_events,
        }

    def _metric(self, metric: str, ready: list[SimEngine], now: float) -> float:
        for engine in ready:
            self.current(engine, now)
        if metric == "in_flight":
            values = [engine.in_flight / engine.view.capacity for engine in ready]
        elif metric == "waiting":
            values = [engine.model.metrics.num_waiting for engine in ready]
        elif metric == "kv_usage":
            values = [engine.model.metrics.kv_usage for engine in ready]
        elif metric == "tokens_per_s":
            values = [self._token_rate(engine, now) for engine in ready]
        else:
            values = [engine.model.predict_ttft(TYPICAL_PROMPT_TOKENS, 0, now) * 1000.0 for engine in ready]
        return sum(values)

    def _token_rate(self, engine: SimEngine, now: float) -> float:
        """Output tokens per second since this engine's previous sample (since it joined, the first
        time; a replica that has just become ready has produced nothing yet)."""
        then, before = self._tokens_seen.get(
            engine.engine_id, (self._since.get(engine.engine_id, self.start), 0)
        )
        self._tokens_seen[engine.engine_id] = (now, engine.output_tokens)
        return (engine.output_tokens - before) / (now - then) if now > then else 0.0

    def _act(self, group: str, actions: ScaleActions, now: float) -> None:
        for engine_id in (*actions.never_ready, *actions.stop):
            self.actuator.stop(engine_id, now)
        self.never_ready += len(actions.never_ready)
        for engine_id in actions.drain:
            self.actuator.drain(engine_id, now)
        for _ in range(actions.start):
            self.actuator.start(group, now)
            self.cold_starts += 1
        if actions.direction != "none" or actions.never_ready:
            self.scale_events.append(
                {
                    "t_s": round(now - self.start, 3),
                    "group": group,
                    "from": actions.before + len(actions.never_ready),
                    "to": actions.decision.replicas,
                    "reason": actions.decision.reason,
                    "observed": actions.decision.observed,
                }
            )

    def _changed(self, change: EngineChange) -> None:
        self._since[change.engine_id] = change.at
