"""The emulator's /metrics: vLLM's current names and labels, parsed by Prometheus' own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from fleetserve.engines.emulator.metrics import CacheConfig, EmulatorMetrics, EngineState


def test_exposition_has_vllm_names_labels_and_live_state() -> None:
    state = EngineState(3, 2, 0.25, 100, 40, 1, ("sql", "chat"), ("math",))
    metrics = EmulatorMetrics("llama", CacheConfig(16, 1000, 0.9, True), max_lora=4, state=lambda: state)
    metrics.time_to_first_token.observe(0.05)
    metrics.generation_tokens.inc(7)
    metrics.request_finished("stop")
    families = {
        family.name: family for family in text_string_to_metric_families(metrics.exposition().decode())
    }

    def value(name: str, sample_name: str | None = None) -> float:
        samples = [s for s in families[name].samples if s.name == (sample_name or name)]
        assert all(s.labels["model_name"] == "llama" for s in samples)
        return samples[0].value

    assert value("vllm:num_requests_running") == 3
    assert value("vllm:num_requests_waiting") == 2
    assert value("vllm:kv_cache_usage_perc") == 0.25
    assert value("vllm:prefix_cache_queries", "vllm:prefix_cache_queries_total") == 100
    assert value("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total") == 40
    assert value("vllm:generation_tokens", "vllm:generation_tokens_total") == 7
    assert value("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"
    for histogram in ("vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds"):
        assert families[histogram].type == "histogram"
    assert families["vllm:request_queue_time_seconds"].type == "histogram"
    lora = families["vllm:lora_requests_info"].samples[0].labels
    assert lora["running_lora_adapters"] == "sql,chat" and lora["waiting_lora_adapters"] == "math"
    assert lora["max_lora"] == "4"
    cache = families["vllm:cache_config_info"].samples[0].labels
    assert cache["block_size"] == "16" and cache["num_gpu_blocks"] == "1000"
    success = families["vllm:request_success"].samples[0]
    assert success.labels["finished_reason"] == "stop" and success.value == 1
