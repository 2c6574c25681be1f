"""What the gateway knows about each engine, as plain state with no I/O: its health state machine, what
its /metrics last said (and the metric names each engine family uses), its models, and the live
`EngineView` policies see. The probing, scraping and registry modules drive these; nothing here awaits,
reads a clock or opens a socket.

Engine health is a small state machine driven by probe and request outcomes:

    STARTING --probe ok--> HEALTHY --N consecutive failures--> EJECTED --eject time over--> HALF_OPEN
    HALF_OPEN --probe ok--> HEALTHY        HALF_OPEN --probe fails--> EJECTED (for twice as long, capped)

An engine gets traffic only when HEALTHY: a starting engine waits for its first good probe, and a
half-open engine must answer a probe before real requests go back to it. Probe failures and request
failures are counted separately, so a /health endpoint that answers while completions hang cannot keep
resetting the request failures that should eject the engine. Nothing here touches in-flight counters.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from fleetserve.config import EngineDescription
from fleetserve.routing.base import EngineView

MAX_EJECT_MULTIPLIER = 8


class HealthState(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    EJECTED = "ejected"
    HALF_OPEN = "half_open"


@dataclass
class EngineHealth:
    """Pure state: every transition takes `now` from the caller."""

    eject_after_failures: int
    eject_duration_s: float
    state: HealthState = HealthState.STARTING
    probe_failures: int = 0
    request_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    @property
    def routable(self) -> bool:
        return self.state is HealthState.HEALTHY

    @property
    def ready(self) -> bool:
        """Has answered a probe at least once since it was added."""
        return self.state is not HealthState.STARTING

    def tick(self, now: float) -> None:
        if self.state is HealthState.EJECTED and now >= self.ejected_until:
            self.state = HealthState.HALF_OPEN

    def probe_succeeded(self, now: float) -> None:
        self.tick(now)
        self.probe_failures = 0
        if self.state in (HealthState.STARTING, HealthState.HALF_OPEN):
            self.state = HealthState.HEALTHY
            self.request_failures = 0

    def probe_failed(self, now: float) -> None:
        self.tick(now)
        if self.state is HealthState.STARTING:
            return  # still loading; not a fault
        if self.state is HealthState.HALF_OPEN:
            self._eject(now)
            return
        self.probe_failures += 1
        if self.state is HealthState.HEALTHY and self.probe_failures >= self.eject_after_failures:
            self._eject(now)

    def request_succeeded(self, now: float) -> None:
        self.request_failures = 0
        if self.state is HealthState.HEALTHY:
            self.ejections = 0

    def request_failed(self, now: float) -> None:
        self.tick(now)
        self.request_failures += 1
        if self.state is HealthState.HEALTHY and self.request_failures >= self.eject_after_failures:
            self._eject(now)

    def unreachable(self, now: float) -> None:
        """Nothing accepts connections at the engine's address: it is down, not slow. Eject at once
        (a starting engine is still loading, which is no fault)."""
        self.tick(now)
        if self.state in (HealthState.HEALTHY, HealthState.HALF_OPEN):
            self._eject(now)

    def _eject(self, now: float) -> None:
        self.ejections += 1
        multiplier = min(2 ** (self.ejections - 1), MAX_EJECT_MULTIPLIER)
        self.state = HealthState.EJECTED
        self.ejected_until = now + self.eject_duration_s * multiplier
        self.probe_failures = self.request_failures = 0


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """What an engine last reported. Fields an engine does not expose stay None."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # 0..1
    num_gpu_blocks: int | None = None
    block_size: int | None = None
    prefix_cache_queries: float | None = None  # tokens, cumulative
    prefix_cache_hits: float | None = None
    running_adapters: frozenset[str] = frozenset()
    waiting_adapters: frozenset[str] = frozenset()
    max_loras: int | None = None
    generation_tokens: float | None = None  # output tokens, cumulative
    ttft_buckets: tuple[tuple[float, float], ...] = ()  # the TTFT histogram: (le seconds, cumulative count)


@dataclass(frozen=True, slots=True)
class Dialect:
    """Metric names of one engine family. Each field lists accepted names, newest first."""

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    kv_usage: tuple[str, ...] = ()
    prefix_cache_queries: tuple[str, ...] = ()
    prefix_cache_hits: tuple[str, ...] = ()
    cache_config_info: str | None = None  # labels block_size, num_gpu_blocks
    lora_info: str | None = None  # labels running_lora_adapters, waiting_lora_adapters, max_lora
    generation_tokens: tuple[str, ...] = ()
    ttft_histogram: str | None = None  # the histogram's name; its `_bucket` series are read

    def wanted(self) -> frozenset[str]:
        names = [
            *self.running,
            *self.waiting,
            *self.kv_usage,
            *self.prefix_cache_queries,
            *self.prefix_cache_hits,
            *self.generation_tokens,
        ]
        names += [name for name in (self.cache_config_info, self.lora_info) if name]
        if self.ttft_histogram:
            names.append(self.ttft_histogram + "_bucket")
        return frozenset(names)


DIALECTS: dict[str, Dialect] = {
    "vllm": Dialect(
        running=("vllm:num_requests_running",),
        waiting=("vllm:num_requests_waiting",),
        kv_usage=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        prefix_cache_queries=("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
        prefix_cache_hits=("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
        cache_config_info="vllm:cache_config_info",
        lora_info="vllm:lora_requests_info",
        generation_tokens=("vllm:generation_tokens_total",),
        ttft_histogram="vllm:time_to_first_token_seconds",
    ),
    "sglang": Dialect(
        running=("sglang:num_running_reqs",),
        waiting=("sglang:num_queue_reqs",),
        kv_usage=("sglang:token_usage",),
        generation_tokens=("sglang:generation_tokens_total",),
        ttft_histogram="sglang:time_to_first_token_seconds",
    ),
    "trtllm": Dialect(
        running=("trtllm_num_requests_running",),
        waiting=("trtllm_num_requests_waiting",),
        kv_usage=("trtllm_kv_cache_utilization",),
    ),
    "llamacpp": Dialect(
        running=("llamacpp:requests_processing",),
        waiting=("llamacpp:requests_deferred",),
        kv_usage=("llamacpp:kv_cache_usage_ratio",),
    ),
}


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """One entry of an engine's /v1/models: a base model (parent None) or a LoRA adapter of `parent`."""

    id: str
    parent: str | None
    raw: dict[str, Any]


@dataclass(eq=False)
class EngineState:
    """One registered engine: its description, health, what it last reported, and its view."""

    spec: EngineDescription
    health: EngineHealth
    capacity: float = 1.0
    models: tuple[ModelEntry, ...] = ()  # from the engine's last good /v1/models
    metrics: EngineMetrics | None = None
    removed: bool = field(default=False, init=False)
    draining: bool = field(default=False, init=False)  # takes no new requests (the fleet actuator's drain)
    # what policies see of this engine, kept for its whole life: the request path counts in-flight
    # requests on it, and `ViewBuilder` refreshes the rest before each decision
    view: EngineView = field(init=False)
    # read on every request: copied out of the description once
    engine_id: str = field(init=False)
    url: str = field(init=False)
    model: str = field(init=False)

    def __post_init__(self) -> None:
        spec = self.spec
        self.engine_id, self.url, self.model = spec.id, spec.url, spec.model
        self.view = EngineView(spec.id, spec.model, spec.gpu, spec.tp)

    @property
    def in_flight(self) -> int:
        """The gateway's own count of requests dispatched here and not yet finished. Only dispatch and
        completion move it: health checks and scrapes never reset it, so an engine that flaps does not
        look idle while it still holds requests."""
        return self.view.in_flight

    @property
    def adapters(self) -> frozenset[str]:
        """Adapters from the fleet file plus those the engine lists as children of its model."""
        listed = {entry.id for entry in self.models if entry.parent is not None}
        return frozenset(self.spec.adapters) | listed

    @property
    def served_names(self) -> frozenset[str]:
        return frozenset({self.model, *self.adapters})
