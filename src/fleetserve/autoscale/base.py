"""The autoscaler interface: `desired(group, window, now) -> Decision`, and the limits every policy
shares (AIBrix's): a tolerance band around the target, at most `max_scale_up_rate` x the ready replicas
up and 1 / `max_scale_down_rate` down per step, a scale-down cooldown, and the group's bounds."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from fleetserve.autoscale.window import MetricWindow


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """A group as an autoscaler sees it: `replicas` it has asked for (starting and ready, not draining),
    of which `ready` serve."""

    name: str
    replicas: int
    ready: int
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int
    reason: str  # why: "scale" (the metric asks for it), "panic", "tolerance", "cooldown", "no_metric", ...
    observed: float | None = None  # the metric value the decision read


@dataclass
class Autoscaler(ABC):
    """`target`: the metric's value per replica the policy aims at; the window holds the group's total
    (the metric summed over its ready replicas)."""

    target: float
    tolerance: float = 0.1
    max_scale_up_rate: float = 2.0
    max_scale_down_rate: float = 2.0
    scale_down_cooldown_s: float = 300.0
    stable_window_s: float = 180.0
    _last_scale_up: float = field(default=-math.inf, init=False)

    name = "autoscaler"

    @property
    def horizon_s(self) -> float:
        """How much history the policy reads."""
        return self.stable_window_s

    @abstractmethod
    def desired(self, group: GroupStatus, window: MetricWindow, now: float) -> Decision: ...

    def scaled_up(self, now: float) -> None:
        """The group grew without this policy's word (activated from zero): the cooldown counts from now."""
        self._last_scale_up = now

    def _limited(self, group: GroupStatus, wanted: int, reason: str, observed: float, now: float) -> Decision:
        """`wanted` within the step limits, the cooldown and the group's bounds."""
        ready = group.ready
        # replicas still starting are never given up for the step limit: a replica that does not come up
        # slows growth (it is not ready) but cannot shrink the group (aibrix#617's stuck scale-up)
        step_up = max(1, group.replicas, math.ceil(self.max_scale_up_rate * ready))
        step_down = math.floor(ready / self.max_scale_down_rate)
        replicas = min(max(wanted, step_down), step_up)
        if replicas < group.replicas and now - self._last_scale_up < self.scale_down_cooldown_s:
            replicas, reason = group.replicas, "cooldown"
        bounded = min(max(replicas, group.min_replicas), group.max_replicas)
        if bounded != replicas:
            reason = "bounds"
        if bounded > group.replicas:
            self._last_scale_up = now
        return Decision(bounded, reason, observed)

    def _hold(self, group: GroupStatus, reason: str, observed: float | None = None) -> Decision:
        """Keep the group's size (within tolerance, or nothing to read), brought within its bounds (which
        the fleet file may have changed)."""
        bounded = min(max(group.replicas, group.min_replicas), group.max_replicas)
        return Decision(bounded, reason if bounded == group.replicas else "bounds", observed)

    def _within_tolerance(self, observed: float) -> bool:
        return abs(observed / self.target - 1.0) <= self.tolerance
