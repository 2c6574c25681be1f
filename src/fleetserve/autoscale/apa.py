"""AIBrix's APA (`pkg/controller/podautoscaler/algorithm/apa.go`, after Huo et al. 2023): desired =
ceil(replicas x observed / target), observed being the metric per ready replica (the group's total over
the stable window, over the replicas ready now), outside target x (1 +- tolerance), with the same step
limits and scale-down cooldown as KPA and no panic mode."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fleetserve.autoscale.base import Autoscaler, Decision, GroupStatus
from fleetserve.autoscale.window import MetricWindow


@dataclass
class APA(Autoscaler):
    name = "apa"

    def desired(self, group: GroupStatus, window: MetricWindow, now: float) -> Decision:
        total = window.mean(now, self.stable_window_s)
        if total is None:
            return self._hold(group, "no_metric")
        observed = total / max(group.ready, 1)
        if self._within_tolerance(observed):
            return self._hold(group, "tolerance", observed)
        wanted = math.ceil(max(group.replicas, 1) * observed / self.target)
        return self._limited(group, wanted, "scale", observed, now)
