"""`planned`: every group of one model that names this policy is sized together, by the GPU-mix planner
over a sliding window of recent traffic (Dynamo's planner re-plans every 180 s; Mélange's integer
program, `mix.py`, does the sizing).

One `FleetPlanner` per model keeps the window: per second, how many requests arrived in each (input,
output) length bucket. Every `window_s` it turns the window into a request rate per bucket and solves
for the cheapest replica counts of its groups that carry that traffic at `headroom` x each replica's
profiled capacity (the profiles the simulator measures, `sim/profiles.py`), within each group's
bounds. Each group's `PlannedAutoscaler` answers its share of the same plan, so no two loops fight
over one fleet (aibrix#436), and the count is taken as it is, not run through another metric's
arithmetic (aibrix#485's 0 replicas). The plan's routes (which bucket goes to which GPU type, Mélange's
`x_ij`) are handed to the `planned` routing policy when it routes. With no traffic in the window every
group goes to its minimum; a bucket no group can serve is left out of the plan and named in its notes.

Two rules keep a change of plan from cutting capacity: groups keep their size until the first window of
traffic has been seen (`warming_up`), and a group shrinks only once every group of its model that the
plan grows has its planned replicas ready (`make_before_break`: moving work from L4s to an H100 starts
the H100 before the L4s drain).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, deque
from dataclasses import dataclass, field

from fleetserve.autoscale.base import Autoscaler, Decision, GroupStatus
from fleetserve.autoscale.mix import GpuOption, LengthBuckets, MixPlan, NoFeasibleMix, solve_mix
from fleetserve.autoscale.window import MetricWindow
from fleetserve.errors import InputError


@dataclass(frozen=True, slots=True)
class PlannedGroup:
    """A group the planner sizes: its GPU option (name, price, profiled capacity per bucket, bounds)."""

    name: str
    option: GpuOption


@dataclass
class FleetPlanner:
    model: str
    groups: list[PlannedGroup]
    buckets: LengthBuckets = field(default_factory=LengthBuckets)
    window_s: float = 180.0
    headroom: float = 0.8
    slice_factor: int = 4
    start: float = 0.0
    plan: MixPlan | None = field(default=None, init=False)
    demand_rps: float = field(default=0.0, init=False)  # the traffic the current plan carries
    notes: list[str] = field(default_factory=list, init=False)
    _planned_at: float = field(default=-math.inf, init=False)
    _seconds: deque[tuple[int, Counter[str]]] = field(default_factory=deque, init=False)
    _ready: dict[str, int] = field(default_factory=dict, init=False)  # group -> replicas ready, last seen

    def __post_init__(self) -> None:
        names = [group.option.name for group in self.groups]
        if len(set(names)) != len(names):
            raise InputError(
                f"planned groups of model {self.model!r} must differ in GPU type or TP degree, got"
                f" {', '.join(sorted(names))}: the plan sizes each kind of replica once"
            )
        if not 0 < self.headroom <= 1:
            raise InputError(f"headroom must be in (0, 1], got {self.headroom}")

    def arrived(self, prompt_len: int, max_output_tokens: int, now: float) -> None:
        second = math.floor(now)
        seconds = self._seconds
        if not seconds or seconds[-1][0] != second:
            seconds.append((second, Counter()))
            while seconds[0][0] + 1 <= second - self.window_s:
                seconds.popleft()
        seconds[-1][1][self.buckets.bucket_of(prompt_len, max_output_tokens).key] += 1

    def demand(self, now: float) -> dict[str, float]:
        """Requests per second of each bucket over the window (over the time since the start while
        that is shorter)."""
        span = max(min(self.window_s, now - self.start), 1.0)
        counts: Counter[str] = Counter()
        for second, seen in self._seconds:
            if second + 1 > now - self.window_s:  # the second [s, s + 1) reaches into the window
                counts.update(seen)
        return {key: count / span for key, count in counts.items()}

    def replicas(self, group: str, now: float) -> int | None:
        """The group's count in the current plan, re-planned when the last plan is `window_s` old; None
        until a whole window of traffic has been seen."""
        if now - self.start < self.window_s:
            return None
        if now - self._planned_at >= self.window_s:
            self._replan(now)
        assert self.plan is not None
        return self.plan.replicas[self._option(group).name]

    def saw(self, group: str, ready: int) -> None:
        """A group's ready replicas now (each group's autoscaler reports its own)."""
        self._ready[group] = ready

    def growing(self, now: float) -> bool:
        """Whether a group of the plan has fewer replicas ready than the plan gives it."""
        plan = self.plan
        return plan is not None and any(
            self._ready.get(g.name, 0) < plan.replicas[g.option.name] for g in self.groups
        )

    def _option(self, group: str) -> GpuOption:
        return next(g.option for g in self.groups if g.name == group)

    def _replan(self, now: float) -> None:
        self._planned_at = now
        options = [group.option for group in self.groups]
        demand = self.demand(now)
        servable = {
            key: rate
            for key, rate in demand.items()
            if any(option.capacity_rps.get(key, 0.0) > 0 for option in options)
        }
        self.demand_rps = sum(servable.values())
        self.notes = [
            f"bucket {key} ({rate:.3g} req/s) fits no group's profile: left out of the plan"
            for key, rate in sorted(demand.items())
            if key not in servable
        ]
        if not servable:
            self.plan = _fixed(options, {o.name: o.min_replicas for o in options}, 0.0)
            return
        try:
            self.plan = solve_mix(servable, options, slice_factor=self.slice_factor, headroom=self.headroom)
        except NoFeasibleMix as exc:  # more traffic than the groups' maximums carry: all of them
            self.notes.append(f"{exc}; every group at its maximum")
            self.plan = _fixed(options, {o.name: o.max_replicas or o.min_replicas for o in options}, 1.0)


def _fixed(options: list[GpuOption], replicas: dict[str, int], utilisation: float) -> MixPlan:
    """A plan of given counts, with no routes (nothing to carry, or more than the groups can)."""
    usd = sum(option.usd_per_hour * replicas[option.name] for option in options)
    return MixPlan(replicas, {}, usd, dict.fromkeys(replicas, utilisation))


def planned_group(name: str, option: GpuOption, min_replicas: int, max_replicas: int) -> PlannedGroup:
    return PlannedGroup(
        name, dataclasses.replace(option, min_replicas=min_replicas, max_replicas=max_replicas)
    )


@dataclass
class PlannedAutoscaler(Autoscaler):
    """One group's share of its model's `FleetPlanner` (the `target` and windows of the base class do
    not apply: the plan sizes the group)."""

    planner: FleetPlanner | None = None

    name = "planned"

    def desired(self, group: GroupStatus, window: MetricWindow, now: float) -> Decision:
        if self.planner is None:
            raise InputError(f"group {group.name}: the planned autoscaler was built without a planner")
        planner = self.planner
        planner.saw(group.name, group.ready)
        wanted = planner.replicas(group.name, now)
        if wanted is None:
            return self._hold(group, "warming_up")
        bounded = min(max(wanted, group.min_replicas), group.max_replicas)
        if bounded < group.replicas and planner.growing(now):
            return self._hold(group, "make_before_break", planner.demand_rps)
        return Decision(bounded, "planned", planner.demand_rps)
