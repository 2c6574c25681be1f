"""vLLM's router (`vllm-router`, Rust, forked from SGLang's) in front of a list of engines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from peers import VLLM_ROUTER
from peers.process import ReadyCheck, ServerSpec, all_of, completion_ok, http_ok

VLLMRouterPolicy = Literal["cache_aware", "round_robin", "random", "power_of_two", "consistent_hash"]


def vllm_router(
    worker_urls: Sequence[str], policy: VLLMRouterPolicy, port: int, host: str = "127.0.0.1"
) -> ServerSpec:
    argv = [
        str(VLLM_ROUTER.binary),
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        "--host",
        host,
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--health-check-interval-secs",
        "1",
    ]
    return ServerSpec(f"vllm-router {policy}", argv, f"http://{host}:{port}")


def vllm_router_ready(model: str) -> ReadyCheck:
    return all_of(http_ok("/health"), completion_ok(model))
