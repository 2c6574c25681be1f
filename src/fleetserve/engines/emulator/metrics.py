"""One Prometheus registry per emulated engine, with vLLM's current metric names and label sets.

Request-level figures (TTFT, inter-token latency, end-to-end latency, queue time, token counts) are
observed as requests progress. Engine state (running, waiting, KV usage, prefix-cache totals, LoRA slots)
is read from the engine model at scrape time, so a scrape always shows the state of that instant.
All durations are wall-clock seconds as the client sees them, i.e. already stretched by the time scale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

_LABELS = ("model_name", "engine")


@dataclass(frozen=True)
class EngineState:
    """What the engine looks like right now; built by the emulated engine from its model at scrape time."""

    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    num_gpu_blocks: int
    gpu_memory_utilization: float
    enable_prefix_caching: bool


class EmulatorMetrics:
    def __init__(
        self,
        model_name: str,
        cache_config: CacheConfig,
        max_lora: int,
        state: Callable[[], EngineState],
        engine_index: str = "0",
    ) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name, "engine": engine_index}

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            family = Histogram(name, documentation, _LABELS, buckets=buckets, registry=self.registry)
            return family.labels(**labels)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, _LABELS, registry=self.registry).labels(**labels)

        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self._request_success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*_LABELS, "finished_reason"),
            registry=self.registry,
        )
        self._labels = labels
        self.registry.register(_StateCollector(labels, cache_config, max_lora, state))

    def request_finished(self, finish_reason: str) -> None:
        self._request_success.labels(**self._labels, finished_reason=finish_reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges and engine-side counters, read from the engine model when Prometheus scrapes."""

    def __init__(
        self,
        labels: dict[str, str],
        cache_config: CacheConfig,
        max_lora: int,
        state: Callable[[], EngineState],
    ) -> None:
        self._labels = labels
        self._cache_config = cache_config
        self._max_lora = max_lora
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, documentation, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, documentation, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", state.num_running
        )
        yield gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", state.num_waiting
        )
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", state.kv_usage)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            state.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            state.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", state.num_preemptions
        )
        lora = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters", *names],
        )
        # vLLM sets this series to the current time; readers keep the newest series
        lora.add_metric(
            [
                str(self._max_lora),
                ",".join(state.waiting_adapters),
                ",".join(state.running_adapters),
                *values,
            ],
            time.time(),
        )
        yield lora
        config = self._cache_config
        cache_info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "num_gpu_blocks",
                "gpu_memory_utilization",
                "enable_prefix_caching",
                *names,
            ],
        )
        cache_info.add_metric(
            [
                str(config.block_size),
                str(config.num_gpu_blocks),
                str(config.gpu_memory_utilization),
                str(config.enable_prefix_caching),
                *values,
            ],
            1.0,
        )
        yield cache_info
