"""From an autoscaler's replica count to engines started, drained and stopped, for one group.

Each round: replicas that have been starting for longer than `ready_timeout_s` are stopped and
replaced (counted in `never_ready`; they never hold scaling up, as in aibrix#617); the autoscaler reads
the group's metric window; more replicas wanted are started; fewer are shed, replicas still starting
first (the newest), then the ready ones with the fewest requests, which are drained (their requests
finish, or move if migration is on), never cut. A group with no replica at all while requests wait for
one gets one at once (`activate`): its metric cannot say so, as no replica reports it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fleetserve.autoscale.base import Autoscaler, Decision, GroupStatus
from fleetserve.autoscale.window import MetricWindow

ReplicaState = Literal["starting", "ready", "draining"]


@dataclass(frozen=True, slots=True)
class Replica:
    engine_id: str
    state: ReplicaState
    since: float  # when it entered that state
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class ScaleActions:
    decision: Decision
    before: int  # replicas (starting or ready) before this round
    start: int = 0
    drain: tuple[str, ...] = ()
    stop: tuple[str, ...] = ()  # starting replicas given up: not wanted any more, or never ready
    never_ready: tuple[str, ...] = ()

    @property
    def direction(self) -> str:
        after = self.decision.replicas
        return "up" if after > self.before else "down" if after < self.before else "none"


@dataclass
class GroupScaler:
    group: str
    autoscaler: Autoscaler
    min_replicas: int
    max_replicas: int
    ready_timeout_s: float = 600.0
    window: MetricWindow = field(init=False)

    def __post_init__(self) -> None:
        self.window = MetricWindow(self.autoscaler.horizon_s)

    def observe(self, now: float, value: float) -> None:
        """The group's metric now: summed over its ready replicas."""
        self.window.add(now, value)

    def step(self, replicas: list[Replica], now: float, waiting_for_replica: int = 0) -> ScaleActions:
        """`waiting_for_replica`: requests held until a replica of the group's model is ready."""
        never_ready = tuple(
            replica.engine_id
            for replica in replicas
            if replica.state == "starting" and now - replica.since > self.ready_timeout_s
        )
        live = [r for r in replicas if r.state != "draining" and r.engine_id not in never_ready]
        ready = [replica for replica in live if replica.state == "ready"]
        status = GroupStatus(self.group, len(live), len(ready), self.min_replicas, self.max_replicas)
        decision = self.autoscaler.desired(status, self.window, now)
        if not live and waiting_for_replica > 0 and decision.replicas < 1 <= self.max_replicas:
            decision = Decision(1, "activate", float(waiting_for_replica))
            self.autoscaler.scaled_up(now)
        wanted = decision.replicas
        if wanted >= len(live):
            return ScaleActions(decision, len(live), start=wanted - len(live), never_ready=never_ready)
        surplus = len(live) - wanted
        starting = sorted((r for r in live if r.state == "starting"), key=lambda r: r.since, reverse=True)
        stop = tuple(replica.engine_id for replica in starting[:surplus])
        idle_first = sorted(ready, key=lambda replica: (replica.in_flight, -replica.since))
        drain = tuple(replica.engine_id for replica in idle_first[: surplus - len(stop)])
        return ScaleActions(decision, len(live), drain=drain, stop=stop, never_ready=never_ready)
