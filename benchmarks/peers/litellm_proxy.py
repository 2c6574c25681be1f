"""LiteLLM's proxy (`litellm --config`, Python) with one model_list deployment per engine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml

from peers import LITELLM
from peers.process import ReadyCheck, ServerSpec, all_of, completion_ok, http_ok

LiteLLMStrategy = Literal["simple-shuffle", "least-busy", "usage-based-routing-v2", "latency-based-routing"]

# No network here: the model cost map is read from the package instead of GitHub, and a tokenizer that
# would come from the Hugging Face hub (LiteLLM counts tokens with one for some model names) fails fast
# instead of retrying for half a minute.
OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "LITELLM_TELEMETRY": "False",
}


def litellm_config(model: str, worker_urls: Sequence[str], strategy: LiteLLMStrategy) -> str:
    deployments = [
        {
            "model_name": model,
            # hosted_vllm: LiteLLM's provider for vLLM's OpenAI server; it forwards vLLM extensions
            # such as ignore_eos unchanged.
            "litellm_params": {"model": f"hosted_vllm/{model}", "api_base": f"{url}/v1", "api_key": "none"},
        }
        for url in worker_urls
    ]
    config = {
        "model_list": deployments,
        "router_settings": {"routing_strategy": strategy, "num_retries": 0},
        "litellm_settings": {"drop_params": False, "set_verbose": False},
    }
    return yaml.safe_dump(config, sort_keys=False)


def litellm_proxy(
    model: str,
    worker_urls: Sequence[str],
    strategy: LiteLLMStrategy,
    port: int,
    config_path: Path,
    host: str = "127.0.0.1",
) -> ServerSpec:
    argv = [str(LITELLM.binary), "--config", str(config_path), "--host", host, "--port", str(port)]
    return ServerSpec(
        f"litellm {strategy}",
        argv,
        f"http://{host}:{port}",
        env=OFFLINE_ENV,
        files={config_path: litellm_config(model, worker_urls, strategy)},
    )


def litellm_ready(model: str) -> ReadyCheck:
    return all_of(http_ok("/health/liveliness"), completion_ok(model))
