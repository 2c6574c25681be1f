"""Autoscaling the live fleet: the fleet's `FleetAutoscaler` (the object the simulator runs), on the wall
clock, reading what the gateway knows of each engine and acting through the gateway's `FleetActuator`
(local processes, or a Ray cluster).

The readings are the gateway's own: requests in flight per unit of capacity (exact), and what the last
`/metrics` scrape said (waiting requests, KV usage, output tokens); `predicted_ttft_ms` is the live
view's estimate (`fleet/view.py`). The loop wakes at the next group's round, and at once when a request
starts waiting for a replica of a group at zero. Every decision is logged with what it read and counted
in `fleetserve_autoscale_decisions_total`; the desired size of each group is a gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fleetserve.autoscale.loop import (
    TYPICAL_PROMPT_TOKENS,
    AutoscaledGroup,
    FleetAutoscaler,
    MetricSource,
    ScaleEvent,
)
from fleetserve.control import FleetActuator
from fleetserve.control.members import FleetMembers
from fleetserve.errors import FleetserveError
from fleetserve.fleet.registry import EngineRegistry
from fleetserve.fleet.view import ViewBuilder
from fleetserve.gateway.metrics import GatewayMetrics
from fleetserve.pipeline import RequestPath

log = logging.getLogger(__name__)

RECENT_EVENTS = 200  # scale events kept for the admin API (the newest)


class GatewayReadings:
    """An engine's autoscaling readings from the gateway's registry and scrapes."""

    def __init__(self, registry: EngineRegistry, views: ViewBuilder) -> None:
        self._registry = registry
        self._views = views

    def in_flight(self, engine_id: str) -> int:
        engine = self._registry.get(engine_id)
        return 0 if engine is None else engine.in_flight

    def reading(self, engine_id: str, name: str, now: float) -> float:
        engine = self._registry.get(engine_id)
        if engine is None:  # up, not yet registered
            return 0.0
        if name == "in_flight":
            return engine.in_flight / engine.capacity
        if name == "predicted_ttft_ms":
            predictor = self._views.engine_view(engine).predictor
            return 0.0 if predictor is None else predictor(TYPICAL_PROMPT_TOKENS, 0) * 1000.0
        metrics = engine.metrics
        if metrics is None:
            return 0.0
        value = {
            "waiting": metrics.waiting,
            "kv_usage": metrics.kv_usage,
            "output_tokens": metrics.generation_tokens,
        }[name]
        return float(value or 0)


class LiveAutoscaling:
    def __init__(
        self,
        groups: list[AutoscaledGroup],
        actuator: FleetActuator,
        members: FleetMembers,
        registry: EngineRegistry,
        views: ViewBuilder,
        metrics: GatewayMetrics,
        *,
        demand: Callable[[str], int] | None = None,
        source: MetricSource | None = None,
        path: RequestPath | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`source` replaces the engines' metrics (a scripted one, to replay a simulated run's)."""
        self._clock = clock
        self.autoscaler = FleetAutoscaler(
            groups,
            actuator,
            members,
            GatewayReadings(registry, views),
            clock(),
            demand,
            source,
            keep_events=RECENT_EVENTS,
        )
        if path is not None:
            self.autoscaler.follow(path)
        self._metrics = metrics
        self._wake = asyncio.Event()
        for group in groups:
            metrics.desired_replicas.labels(group.name).set(group.replicas_at_start)

    @property
    def start(self) -> float:
        return self.autoscaler.start

    def activate(self) -> None:
        """A request waits for a replica of a group at zero: decide now, not at the next round."""
        self._wake.set()

    async def run(self) -> None:
        autoscaler = self.autoscaler
        while True:
            now = self._clock()
            try:
                if self._wake.is_set():
                    self._wake.clear()
                    self._record(autoscaler.activate(now), now)
                self._record(autoscaler.run(now), now)
            except FleetserveError as exc:  # an engine that left meanwhile, say: the next round sees it
                log.warning("autoscaling round failed: %s", exc)
            delay = max(autoscaler.due() - self._clock(), 0.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    def _record(self, events: list[ScaleEvent], now: float) -> None:
        """Metrics and a log line for every round taken at `now`, and its scale events."""
        for name, actions in self.autoscaler.last.items():
            decision = actions.decision
            self._metrics.desired_replicas.labels(name).set(decision.replicas)
            self._metrics.autoscale_decisions.labels(name, actions.direction, decision.reason).inc()
        self.autoscaler.last.clear()
        for event in events:
            log.info(
                "autoscale %s: %d -> %d replicas (%s; metric %s = %s over %d ready%s)",
                event.group,
                event.before,
                event.after,
                event.reason,
                self.autoscaler.groups[event.group].metric,
                "none" if event.observed is None else f"{event.observed:.3g}",
                event.ready,
                f"; never ready: {', '.join(event.never_ready)}" if event.never_ready else "",
            )

    def report(self) -> dict[str, Any]:
        """The admin API's view: each group's policy and metric, and the recent scale events."""
        return self.autoscaler.summary()
