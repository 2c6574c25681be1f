import pytest

from fleetserve.fleet.scrape import parse_metrics
from fleetserve.fleet.state import DIALECTS

VLLM_NEW = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 250.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",num_gpu_blocks="27000"} 1.0
vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",waiting_lora_adapters="math"} 1.8e9
vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="llama"} 0.0
"""

VLLM_OLD = """\
vllm:num_requests_running{model_name="llama"} 1.0
vllm:num_requests_waiting{model_name="llama"} 0.0
vllm:gpu_cache_usage_perc{model_name="llama"} 0.75
vllm:gpu_prefix_cache_queries_total{model_name="llama"} 10.0
vllm:gpu_prefix_cache_hits_total{model_name="llama"} 5.0
"""


def test_vllm_current_names_sum_series_and_average_kv_usage() -> None:
    metrics = parse_metrics(VLLM_NEW, DIALECTS["vllm"])
    assert (metrics.running, metrics.waiting) == (5, 4)
    assert metrics.kv_usage == pytest.approx(0.375)
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (1000.0, 250.0)
    assert (metrics.block_size, metrics.num_gpu_blocks) == (16, 27000)


def test_vllm_lora_info_takes_the_newest_series() -> None:
    metrics = parse_metrics(VLLM_NEW, DIALECTS["vllm"])
    assert metrics.running_adapters == {"sql", "chat"}
    assert metrics.waiting_adapters == {"math"}
    assert metrics.max_loras == 4


def test_vllm_old_names_are_accepted() -> None:
    metrics = parse_metrics(VLLM_OLD, DIALECTS["vllm"])
    assert (metrics.running, metrics.waiting, metrics.kv_usage) == (1, 0, 0.75)
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (10.0, 5.0)


def test_sglang() -> None:
    text = (
        '# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs{model_name="m"} 7\n'
        'sglang:num_queue_reqs{model_name="m"} 2\nsglang:token_usage{model_name="m"} 0.6\n'
    )
    metrics = parse_metrics(text, DIALECTS["sglang"])
    assert (metrics.running, metrics.waiting, metrics.kv_usage) == (7, 2, 0.6)


def test_tensorrt_llm() -> None:
    text = "trtllm_num_requests_running 4\ntrtllm_num_requests_waiting 1\ntrtllm_kv_cache_utilization 0.2\n"
    metrics = parse_metrics(text, DIALECTS["trtllm"])
    assert (metrics.running, metrics.waiting, metrics.kv_usage) == (4, 1, 0.2)


def test_llamacpp() -> None:
    text = (
        "# HELP llamacpp:requests_processing Number of requests processing.\n"
        "llamacpp:requests_processing 2\nllamacpp:requests_deferred 5\nllamacpp:kv_cache_usage_ratio 0.125\n"
        "llamacpp:prompt_tokens_total 6886\n"
    )
    metrics = parse_metrics(text, DIALECTS["llamacpp"])
    assert (metrics.running, metrics.waiting, metrics.kv_usage) == (2, 5, 0.125)


def test_absent_figures_stay_none_and_garbage_is_skipped() -> None:
    text = 'vllm:num_requests_running{model_name="a}b\\"c"} 2\nvllm:num_requests_waiting not-a-number\n\n'
    metrics = parse_metrics(text, DIALECTS["vllm"])
    assert metrics.running == 2
    assert metrics.waiting is None and metrics.kv_usage is None and metrics.num_gpu_blocks is None


def test_timestamps_after_the_value_are_ignored() -> None:
    metrics = parse_metrics("sglang:num_queue_reqs 3 1700000000000\n", DIALECTS["sglang"])
    assert metrics.waiting == 3


def test_output_tokens_and_the_ttft_histogram_are_read_per_dialect_and_summed_per_bucket() -> None:
    text = """\
vllm:generation_tokens_total{engine="0"} 120.0
vllm:generation_tokens_total{engine="1"} 30.0
vllm:time_to_first_token_seconds_bucket{le="0.1",engine="0"} 2.0
vllm:time_to_first_token_seconds_bucket{le="0.1",engine="1"} 1.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",engine="0"} 5.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",engine="1"} 1.0
vllm:time_to_first_token_seconds_sum{engine="0"} 9.0
"""
    metrics = parse_metrics(text, DIALECTS["vllm"])
    assert metrics.generation_tokens == 150.0
    assert metrics.ttft_buckets == ((0.1, 3.0), (float("inf"), 6.0))
    sglang = parse_metrics("sglang:generation_tokens_total 7\n", DIALECTS["sglang"])
    assert (sglang.generation_tokens, sglang.ttft_buckets) == (7.0, ())
