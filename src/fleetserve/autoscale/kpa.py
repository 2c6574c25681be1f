"""AIBrix's KPA (Knative's pod autoscaler, `pkg/controller/podautoscaler/algorithm/kpa.go`): desired =
ceil(observed / target), observed being the group's total (the metric summed over its ready replicas)
averaged over the stable window (180 s), no change while observed / replicas is within target x
(1 +- tolerance); panic when the panic window's mean (60 s) is more than
`panic_threshold` (2.0) x the stable window's (or the stable mean is 0 and the panic mean is not): then
the panic window's figure sizes the group and it never shrinks until a whole stable window has passed
without panic (the high-water mark)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fleetserve.autoscale.base import Autoscaler, Decision, GroupStatus
from fleetserve.autoscale.window import MetricWindow


@dataclass
class KPA(Autoscaler):
    panic_window_s: float = 60.0
    panic_threshold: float = 2.0
    _panic_since: float | None = field(default=None, init=False)
    _high_water: int = field(default=0, init=False)

    name = "kpa"

    @property
    def horizon_s(self) -> float:
        return max(self.stable_window_s, self.panic_window_s)

    def desired(self, group: GroupStatus, window: MetricWindow, now: float) -> Decision:
        stable = window.mean(now, self.stable_window_s)
        panic = window.mean(now, self.panic_window_s)
        if stable is None or panic is None:
            return self._hold(group, "no_metric")
        if (stable <= 0 < panic) or (stable > 0 and panic / stable > self.panic_threshold):
            self._panic_since = now
        elif self._panic_since is not None and now - self._panic_since >= self.stable_window_s:
            self._panic_since = None
            self._high_water = 0
        if self._panic_since is not None:
            wanted = max(math.ceil(panic / self.target), self._high_water, group.replicas)
            decision = self._limited(group, wanted, "panic", panic, now)
            self._high_water = max(self._high_water, decision.replicas)
            return decision
        if group.replicas and self._within_tolerance(stable / group.replicas):
            return self._hold(group, "tolerance", stable)
        return self._limited(group, math.ceil(stable / self.target), "scale", stable, now)
