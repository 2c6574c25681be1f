"""Autoscaling a fleet: every autoscaled group's `GroupScaler`, run every `interval_s` on the group's
metric, acting through a `FleetActuator`. This is the object both clocks drive: the simulator calls
`run(now)` at virtual times, the gateway's loop at wall times; what differs is only where the metric
comes from (a `MetricSource`) and which actuator acts.

Each round of a group: its ready replicas' metric is summed (AIBrix's and Knative's arithmetic read the
group's total) into the scaler's window, the scaler answers started, drained and stopped engines, and
the actuator is asked for them. A group at zero replicas whose model has requests waiting for a
replica (`demand`) gets one started at once (`activate`), as Knative's activator wakes a scaled-to-zero
revision. Every change of a group's size is a `ScaleEvent`, the same record live and simulated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from fleetserve.autoscale.mix import MixPlan
from fleetserve.autoscale.planned import FleetPlanner, PlannedAutoscaler
from fleetserve.autoscale.scaler import GroupScaler, Replica, ReplicaState, ScaleActions
from fleetserve.control.actuator import CannotStart, EngineChange, EngineEvent, FleetActuator
from fleetserve.control.members import FleetMembers
from fleetserve.routing.base import RequestInfo
from fleetserve.routing.planned import PlannedPolicy

if TYPE_CHECKING:
    from fleetserve.pipeline import RequestPath

TYPICAL_PROMPT_TOKENS = 1024  # the prompt whose predicted TTFT the predicted_ttft_ms metric reads
STATES: dict[EngineEvent, ReplicaState] = {
    EngineEvent.STARTING: "starting",
    EngineEvent.READY: "ready",
    EngineEvent.DRAINING: "draining",
}


@dataclass(frozen=True, slots=True)
class AutoscaledGroup:
    name: str
    model: str
    metric: str  # in_flight, waiting, kv_usage, predicted_ttft_ms or tokens_per_s
    interval_s: float
    scaler: GroupScaler
    replicas_at_start: int


@dataclass(frozen=True, slots=True)
class ScaleEvent:
    at: float  # on the driver's clock
    group: str
    before: int  # replicas (starting or ready) before the round, never-ready ones included
    after: int
    reason: str
    observed: float | None  # the metric value the decision read
    ready: int  # replicas ready when it was taken
    never_ready: tuple[str, ...] = ()

    def record(self, start: float) -> dict[str, Any]:
        """The event as `sim` JSON and the admin API report it, timed from `start`."""
        return {
            "t_s": round(self.at - start, 3),
            "group": self.group,
            "from": self.before,
            "to": self.after,
            "reason": self.reason,
            "observed": self.observed,
        }


class EngineReadings(Protocol):
    """What a driver reads off one engine now: `in_flight` per unit of relative capacity, `waiting`
    requests, `kv_usage` 0-1, `predicted_ttft_ms` of a `TYPICAL_PROMPT_TOKENS` prompt, or cumulative
    `output_tokens` (`tokens_per_s` is computed here from it, so both clocks compute it alike); and its
    requests in flight (to choose whom to drain)."""

    def reading(self, engine_id: str, name: str, now: float) -> float: ...
    def in_flight(self, engine_id: str) -> int: ...


class MetricSource(Protocol):
    """A group's metric now, summed over its ready replicas; None when there is nothing to read."""

    def group_total(self, group: AutoscaledGroup, ready: Sequence[str], now: float) -> float | None: ...


@dataclass
class EngineMetricSource:
    """The metric from the engines themselves: each ready replica's reading, summed; `tokens_per_s` is
    each replica's output tokens since its previous sample (since it became ready, the first time)."""

    readings: EngineReadings
    members: FleetMembers
    _tokens_seen: dict[str, tuple[float, float]] = field(default_factory=dict)

    def group_total(self, group: AutoscaledGroup, ready: Sequence[str], now: float) -> float | None:
        if not ready:
            return None
        if group.metric == "tokens_per_s":
            for gone in [e for e in self._tokens_seen if self.members.get(e) is None]:
                del self._tokens_seen[gone]  # engines that left: the record stays bounded
            return sum(self._token_rate(engine_id, now) for engine_id in ready)
        return sum(self.readings.reading(engine_id, group.metric, now) for engine_id in ready)

    def _token_rate(self, engine_id: str, now: float) -> float:
        produced = self.readings.reading(engine_id, "output_tokens", now)
        member = self.members.get(engine_id)
        then, before = self._tokens_seen.get(engine_id, (now if member is None else member.since, 0.0))
        self._tokens_seen[engine_id] = (now, produced)
        return (produced - before) / (now - then) if now > then else 0.0


class FleetAutoscaler:
    """Every autoscaled group of a fleet; see the module docstring. `demand(model)`: requests waiting
    for a replica of `model` (the activator stage's count), for groups that scale to zero."""

    def __init__(
        self,
        groups: Sequence[AutoscaledGroup],
        actuator: FleetActuator,
        members: FleetMembers,
        readings: EngineReadings,
        start: float,
        demand: Callable[[str], int] | None = None,
        source: MetricSource | None = None,
        keep_events: int | None = None,
    ) -> None:
        """`source`: where each group's metric comes from (default: the engines' `readings`, summed; a
        scripted source replays another run's). `keep_events`: how many scale events to keep (the
        newest); None: all of them."""
        self.groups = {group.name: group for group in groups}
        self.actuator = actuator
        self.members = members
        self.source = source or EngineMetricSource(readings, members)
        self.readings = readings
        self.start = start
        self.demand = demand
        self.events: deque[ScaleEvent] = deque(maxlen=keep_events)
        self.cold_starts = 0
        self.never_ready = 0
        self.last: dict[str, ScaleActions] = {}  # group -> its last round's answer
        self._next_round = dict.fromkeys(self.groups, start)
        self.planners: dict[str, FleetPlanner] = {}  # model -> the planner of its planned groups
        for group in groups:
            autoscaler = group.scaler.autoscaler
            if isinstance(autoscaler, PlannedAutoscaler) and autoscaler.planner is not None:
                self.planners[group.model] = autoscaler.planner
        self._routes_to: Callable[[dict[str, dict[str, float]]], None] | None = None
        self._plans_seen: dict[str, MixPlan | None] = {}
        actuator.subscribe(self._changed)

    def follow(self, path: RequestPath) -> None:
        """Count the requests of `path` as the planned groups' traffic, and hand each new plan's routes
        (bucket -> GPU type -> requests/s) to its routing policy when that is `planned`."""
        if self.planners:
            path.observe(self._arrived)
        if isinstance(path.policy, PlannedPolicy):
            self._routes_to = path.policy.set_routes

    def _arrived(self, request: RequestInfo) -> None:
        planner = self.planners.get(request.model)
        if planner is not None:
            planner.arrived(request.prompt_len, request.max_output_tokens, request.arrival_time)

    def _changed(self, change: EngineChange) -> None:
        """A replica that died before it was ready is never ready too: counted, and replaced by the
        group's next round (which finds one replica fewer than it asked for)."""
        if change.failed and change.group in self.groups:
            self.never_ready += 1

    def due(self) -> float:
        """When the next group's round is due."""
        return min(self._next_round.values())

    def run(self, now: float) -> list[ScaleEvent]:
        """Every group whose round is due: sample, decide, act. Returns the round's scale events."""
        events = []
        for name, group in self.groups.items():
            if self._next_round[name] > now:
                continue
            self._next_round[name] = now + group.interval_s
            event = self._round(group, now)
            if event is not None:
                events.append(event)
        self.events.extend(events)
        self._share_routes()
        return events

    def _share_routes(self) -> None:
        plans = {model: planner.plan for model, planner in self.planners.items()}
        if self._routes_to is None or plans == self._plans_seen:
            return
        self._plans_seen = plans
        routes: dict[str, dict[str, float]] = {}
        for plan in plans.values():
            for bucket, row in ({} if plan is None else plan.routes).items():
                merged = routes.setdefault(bucket, {})
                for option, rate in row.items():
                    merged[option] = merged.get(option, 0.0) + rate
        self._routes_to(routes)

    def activate(self, now: float) -> list[ScaleEvent]:
        """Groups at zero whose model has requests waiting: their round now, not at its interval."""
        if self.demand is None:
            return []
        due = [
            self._first_of(model)
            for model in {group.model for group in self.groups.values()}
            if self._idle(model) and self.demand(model) > 0
        ]
        for name in due:
            self._next_round[name] = now
        return self.run(now) if due else []

    def _first_of(self, model: str) -> str:
        """The group of `model` a replica is started in when it has none: the first in the fleet file."""
        return next(name for name, group in self.groups.items() if group.model == model)

    def _idle(self, model: str) -> bool:
        """No group of `model` has a replica, ready or starting."""
        return not any(
            member.state is not EngineEvent.DRAINING
            for name, group in self.groups.items()
            if group.model == model
            for member in self.members.of_group(name)
        )

    def _live(self, group: str) -> list[Replica]:
        return [
            Replica(
                member.engine_id,
                STATES[member.state],
                member.since,
                self.readings.in_flight(member.engine_id),
            )
            for member in self.members.of_group(group)
        ]

    def _round(self, group: AutoscaledGroup, now: float) -> ScaleEvent | None:
        replicas = self._live(group.name)
        ready = [replica.engine_id for replica in replicas if replica.state == "ready"]
        total = self.source.group_total(group, ready, now)
        if total is not None:
            group.scaler.observe(now, total)
        # requests waiting for a replica start one in the model's first group, and only when the model
        # has none anywhere
        waiting = 0
        if self.demand is not None and self._first_of(group.model) == group.name and self._idle(group.model):
            waiting = self.demand(group.model)
        actions = group.scaler.step(replicas, now, waiting_for_replica=waiting)
        self.last[group.name] = actions
        for engine_id in (*actions.never_ready, *actions.stop):
            self.actuator.stop(engine_id, now)
        self.never_ready += len(actions.never_ready)
        for engine_id in actions.drain:
            self.actuator.drain(engine_id, now)
        for _ in range(actions.start):
            try:
                self.actuator.start(group.name, now)
            except CannotStart:  # the actuator says why in its log; the next round tries again
                self.never_ready += 1
                continue
            self.cold_starts += 1
        if actions.direction == "none" and not actions.never_ready:
            return None
        decision = actions.decision
        return ScaleEvent(
            now,
            group.name,
            actions.before + len(actions.never_ready),
            decision.replicas,
            decision.reason,
            decision.observed,
            len(ready),
            actions.never_ready,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "autoscale": {
                name: {
                    "policy": group.scaler.autoscaler.name,
                    "metric": group.metric,
                    "replicas_at_start": group.replicas_at_start,
                }
                for name, group in self.groups.items()
            },
            "cold_starts": self.cold_starts,
            "never_ready": self.never_ready,
            "plans": {
                model: {
                    "replicas": planner.plan.replicas,
                    "usd_per_hour": round(planner.plan.usd_per_hour, 4),
                    "demand_rps": round(planner.demand_rps, 4),
                    "notes": planner.notes,
                }
                for model, planner in self.planners.items()
                if planner.plan is not None
            },
            "scale_events": [event.record(self.start) for event in self.events],
        }
