"""The gateway's Prometheus metrics, measured where the client sees them (at the gateway, not the engine).

Each gateway owns its own CollectorRegistry, so several gateways (or tests) in one process do not
collide; engine state is exported by a collector that reads the registry at scrape time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fleetserve.control.members import FleetMembers
from fleetserve.fleet.kv_events import KVEventHub
from fleetserve.fleet.registry import EngineRegistry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class GatewayMetrics:
    def __init__(
        self,
        engines: EngineRegistry,
        kv_events: Callable[[], KVEventHub | None] = lambda: None,
        members: FleetMembers | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "fleetserve_gateway_requests",
            "Requests answered by the gateway, by requested model, engine and HTTP status.",
            ["model", "engine", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "fleetserve_gateway_time_to_first_token_seconds",
            "Arrival at the gateway to the first response byte sent to the client.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inter_token = Histogram(
            "fleetserve_gateway_inter_token_latency_seconds",
            "Gap between consecutive stream chunks forwarded to the client.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "fleetserve_gateway_e2e_request_latency_seconds",
            "Arrival at the gateway to the last response byte.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "fleetserve_gateway_routing_decisions",
            "Routing decisions, by policy and the decision's reason.",
            ["policy", "reason"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "fleetserve_gateway_upstream_errors",
            "Failed upstream attempts, by engine and kind (connect, status, timeout, stream).",
            ["engine", "kind"],
            registry=self.registry,
        )
        self.retries = Counter(
            "fleetserve_gateway_retries",
            "Requests re-sent to another engine before their first byte.",
            ["model"],
            registry=self.registry,
        )
        self.stream_resumes = Counter(
            "fleetserve_stream_resumes",
            "Streams continued on another engine after theirs failed mid-stream, by why it failed"
            " (stream: the connection broke; stall: nothing for stream_stall_timeout_s; migration: a move"
            " whose destination refused it).",
            ["reason"],
            registry=self.registry,
        )
        self.migrations = Counter(
            "fleetserve_migrations",
            "Running requests the migration controller moved between engines, by why (load, drain) and"
            " how it ended (moved; abandoned: it finished or left first; failed: the destination refused"
            " and the stream resumed elsewhere).",
            ["reason", "outcome"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fleetserve_gateway_requests_in_flight",
            "Requests admitted by the gateway and not yet answered.",
            registry=self.registry,
        )
        self.tenant_requests = Counter(
            "fleetserve_tenant_requests",
            "Requests answered, by tenant and HTTP status (the tenant's name, never its key).",
            ["tenant", "status"],
            registry=self.registry,
        )
        self.tenant_tokens = Counter(
            "fleetserve_tenant_tokens",
            "Tokens of answered requests, by tenant and kind (prompt, output).",
            ["tenant", "kind"],
            registry=self.registry,
        )
        self.tenant_refusals = Counter(
            "fleetserve_tenant_refusals",
            "Requests refused by the tenant checks, by tenant and reason (unauthorized, forbidden_model,"
            " quota, quota_too_large, quota_store_down).",
            ["tenant", "reason"],
            registry=self.registry,
        )
        self.quota_shared = Gauge(
            "fleetserve_quota_shared",
            "1 while quotas and VTC counters are shared through Redis; 0 while limits are per replica"
            " (no Redis configured, or Redis unreachable).",
            registry=self.registry,
        )
        self.held = Gauge(
            "fleetserve_gateway_requests_held",
            "Requests a pipeline stage holds (waiting for room in the fleet) right now.",
            registry=self.registry,
        )
        self.refusals = Counter(
            "fleetserve_gateway_pipeline_refusals",
            "Requests a pipeline stage or the policy refused, by reason (shed, queue_timeout, no_engine...).",
            ["reason"],
            registry=self.registry,
        )
        self.desired_replicas = Gauge(
            "fleetserve_autoscale_desired_replicas",
            "Replicas the autoscaler last asked for, per autoscaled engine group.",
            ["group"],
            registry=self.registry,
        )
        self.autoscale_decisions = Counter(
            "fleetserve_autoscale_decisions",
            "Autoscaler rounds, by group, direction (up, down, none) and reason (scale, panic, tolerance,"
            " cooldown, bounds, activate, no_metric).",
            ["group", "direction", "reason"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engines, kv_events, members or FleetMembers()))
        # resident memory, open file descriptors and CPU of the gateway process (what a soak run watches)
        ProcessCollector(registry=self.registry)
        self.tasks = Gauge(
            "fleetserve_gateway_asyncio_tasks",
            "asyncio tasks alive in the gateway's event loop (requests, probes, scrapes, subscriptions).",
            registry=self.registry,
        )
        self.tasks.set_function(_task_count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped from outside a running loop (a test calling exposition() directly)
        return 0.0


class _EngineCollector(Collector):
    def __init__(
        self,
        engines: EngineRegistry,
        kv_events: Callable[[], KVEventHub | None],
        members: FleetMembers,
    ) -> None:
        self._engines = engines
        self._kv_events = kv_events
        self._members = members

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["engine", "model", "gpu"]
        in_flight = GaugeMetricFamily(
            "fleetserve_engine_in_flight", "Requests the gateway has on the engine.", labels=labels
        )
        routable = GaugeMetricFamily(
            "fleetserve_engine_routable",
            "1 when the engine takes traffic (healthy and ready).",
            labels=labels,
        )
        running = GaugeMetricFamily("fleetserve_engine_running", "Scraped running requests.", labels=labels)
        waiting = GaugeMetricFamily("fleetserve_engine_waiting", "Scraped waiting requests.", labels=labels)
        kv_usage = GaugeMetricFamily(
            "fleetserve_engine_kv_usage", "Scraped KV-cache usage (0..1).", labels=labels
        )
        for engine in self._engines.engines():
            values = [engine.engine_id, engine.model, engine.spec.gpu or ""]
            in_flight.add_metric(values, engine.in_flight)
            routable.add_metric(values, 1.0 if engine.health.routable else 0.0)
            metrics = engine.metrics
            if metrics is not None:
                if metrics.running is not None:
                    running.add_metric(values, metrics.running)
                if metrics.waiting is not None:
                    waiting.add_metric(values, metrics.waiting)
                if metrics.kv_usage is not None:
                    kv_usage.add_metric(values, metrics.kv_usage)
        yield from (in_flight, routable, running, waiting, kv_usage)
        lifecycle = GaugeMetricFamily(
            "fleetserve_engines",
            "Engines of each group by lifecycle state (starting, ready, draining).",
            labels=["group", "state"],
        )
        for (group, state), count in sorted(self._members.counts().items()):
            lifecycle.add_metric([group, state], count)
        yield lifecycle
        hub = self._kv_events()
        if hub is not None:
            yield from _kv_event_families(hub)


def _kv_event_families(hub: KVEventHub) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """What the precise prefix index knows per followed engine, and how its event stream is doing."""
    blocks = GaugeMetricFamily(
        "fleetserve_engine_prefix_index_blocks",
        "Blocks the precise prefix index (fed by the engine's KV events) says the engine holds.",
        labels=["engine"],
    )
    counters = {
        name: CounterMetricFamily(f"fleetserve_kv_events_{name}", help_text, labels=["engine"])
        for name, help_text in (
            ("batches", "KV-event batches applied, live or replayed."),
            ("gaps", "Sequence gaps seen on the live KV-event stream."),
            ("replayed", "KV-event batches recovered through the replay socket."),
            ("resets", "Times the engine's blocks were forgotten (replay impossible, or restart)."),
        )
    }
    for engine_id, subscriber in hub.subscribers.items():
        blocks.add_metric([engine_id], hub.index.engine_blocks(engine_id))
        for name, family in counters.items():
            family.add_metric([engine_id], getattr(subscriber.stats, name))
    yield blocks
    yield from counters.values()
