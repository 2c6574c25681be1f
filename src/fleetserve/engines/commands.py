"""Command lines for the engines fleetserve launches: llama.cpp (llama-cpp-python's server), vLLM and
SGLang, assembled from a fleet file's engine group. Flag names follow each engine's own CLI
(`python -m llama_cpp.server --help`, `vllm serve --help`, `python -m sglang.launch_server --help`);
docs/engines.md maps every fleet-file field to its flag.

Every engine serves the model under the group's `model` name, so clients and the router use one name
whatever engine answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fleetserve.config import EngineGroup, EngineInstance, kv_event_ports
from fleetserve.engines.launcher import EngineSpec
from fleetserve.engines.smollm2 import smollm2_gguf_path
from fleetserve.errors import InputError
from fleetserve.model.catalog import UnknownEntry, default_catalog

DEFAULT_N_CTX = 2048


def kv_events_config(engine_id: str, http_port: int) -> str:
    """The `--kv-events-config` JSON (vLLM's KVEventsConfig; SGLang reads the same fields). The topic
    is the engine id, so a subscriber that merges several streams still knows each event's engine."""
    publish, replay = kv_event_ports(http_port)
    return json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{publish}",
            "replay_endpoint": f"tcp://*:{replay}",
            "topic": engine_id,
        },
        separators=(",", ":"),
    )


def llamacpp_argv(
    model_path: str | Path,
    *,
    alias: str,
    host: str,
    port: int,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int = 1,
    python: str = sys.executable,
) -> tuple[str, ...]:
    # One thread per replica by default: replicas, not threads, are what fleetserve spreads load over.
    # --interrupt_requests False: llama-cpp-python otherwise cuts a running stream short whenever another
    # request arrives, and a gateway's health probes (GET /v1/models) arrive every second.
    return (
        python, "-m", "llama_cpp.server",
        "--model", str(model_path),
        "--model_alias", alias,
        "--host", host,
        "--port", str(port),
        "--n_ctx", str(n_ctx),
        "--n_threads", str(n_threads),
        "--n_threads_batch", str(n_threads),
        "--interrupt_requests", "False",
    )  # fmt: skip


def vllm_argv(
    instance: EngineInstance, *, host: str, weights: str | None = None, python: str = sys.executable
) -> tuple[str, ...]:
    group, args = instance.group, instance.group.engine_args
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", weights or model_weights(group.model),
        "--served-model-name", group.model,
        "--host", host,
        "--port", str(_port(instance)),
        "--tensor-parallel-size", str(group.tp),
        "--block-size", str(args.block_size),
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--enable-prefix-caching" if args.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enable-chunked-prefill" if args.enable_chunked_prefill else "--no-enable-chunked-prefill",
        "--scheduling-policy", args.scheduling_policy,
    ]  # fmt: skip
    if group.adapters:
        _check_lora_slots(group)
        argv += [
            "--enable-lora",
            "--max-loras", str(args.max_loras),
            "--max-cpu-loras", str(max(args.max_cpu_loras, args.max_loras)),
            "--max-lora-rank", str(args.max_lora_rank),
            "--lora-modules", *(_name_equals_path(adapter) for adapter in group.adapters),
        ]  # fmt: skip
    if group.kv_events:
        argv += ["--kv-events-config", kv_events_config(instance.engine_id, _port(instance))]
    return tuple(argv)


def sglang_argv(
    instance: EngineInstance, *, host: str, weights: str | None = None, python: str = sys.executable
) -> tuple[str, ...]:
    group, args = instance.group, instance.group.engine_args
    argv = [
        python, "-m", "sglang.launch_server",
        "--model-path", weights or model_weights(group.model),
        "--served-model-name", group.model,
        "--host", host,
        "--port", str(_port(instance)),
        "--tp", str(group.tp),
        "--page-size", str(args.block_size),
        "--max-running-requests", str(args.max_num_seqs),
        "--max-prefill-tokens", str(args.max_num_batched_tokens),
        # SGLang's way to turn chunked prefill off is a chunk size of -1.
        "--chunked-prefill-size", str(args.max_num_batched_tokens if args.enable_chunked_prefill else -1),
        "--mem-fraction-static", str(args.gpu_memory_utilization),
        "--enable-metrics",
    ]  # fmt: skip
    if not args.enable_prefix_caching:
        argv.append("--disable-radix-cache")
    if args.scheduling_policy == "priority":
        argv.append("--enable-priority-scheduling")
    else:
        argv += ["--schedule-policy", "fcfs"]
    if group.adapters:
        _check_lora_slots(group)
        argv += [
            "--enable-lora",
            "--max-loras-per-batch", str(args.max_loras),
            "--max-loaded-loras", str(max(args.max_cpu_loras, args.max_loras)),
            "--max-lora-rank", str(args.max_lora_rank),
            "--lora-paths", *(_name_equals_path(adapter) for adapter in group.adapters),
        ]  # fmt: skip
    if group.kv_events:
        argv += ["--kv-events-config", kv_events_config(instance.engine_id, _port(instance))]
    return tuple(argv)


def llamacpp_replica_argv(instance: EngineInstance, host: str) -> tuple[str, ...]:
    """The command line of one replica of a llamacpp group."""
    group = instance.group
    return llamacpp_argv(llamacpp_weights(group.model), alias=group.model, host=host, port=_port(instance))


def vllm_env(group: EngineGroup) -> dict[str, str]:
    """vLLM loads adapters at run time (POST /v1/load_lora_adapter) only when told it may."""
    return {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if group.adapters else {}


def llamacpp_replicas(
    replicas: int,
    base_port: int,
    *,
    host: str = "127.0.0.1",
    alias: str,
    model_path: str | Path,
    n_ctx: int = DEFAULT_N_CTX,
    n_threads: int = 1,
) -> list[EngineSpec]:
    """`replicas` llama.cpp servers of one model on consecutive ports, named ALIAS-0, ALIAS-1, ..."""
    return [
        EngineSpec(
            f"{alias}-{index}",
            llamacpp_argv(
                model_path, alias=alias, host=host, port=base_port + index, n_ctx=n_ctx, n_threads=n_threads
            ),
            base_port + index,
            host,
        )
        for index in range(replicas)
    ]


def model_weights(model: str) -> str:
    """What vLLM and SGLang load for a fleet-file model name: the catalog's Hugging Face id when the
    name is a catalog entry, otherwise the name itself (a Hugging Face id or a local directory)."""
    try:
        hf_id = default_catalog().model(model).hf_id
    except UnknownEntry:
        return model
    return hf_id or model


def llamacpp_weights(model: str) -> Path:
    """A llama.cpp group's `model` is a .gguf file to load, or just the name to serve the bundled
    SmolLM2-135M-Instruct GGUF under (the one model available without a download)."""
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model file not found: {path}")
        return path
    return smollm2_gguf_path()


def _port(instance: EngineInstance) -> int:
    if instance.port is None:
        raise InputError(f"engine {instance.engine_id} has no port to listen on")
    return instance.port


def _name_equals_path(adapter: str) -> str:
    # Both engines take NAME=PATH; a bare name is also its path (a Hugging Face id or a directory).
    return adapter if "=" in adapter else f"{adapter}={adapter}"


def _check_lora_slots(group: EngineGroup) -> None:
    if group.engine_args.max_loras < 1:
        raise InputError(f"engine group {group.name} lists adapters but engine_args.max_loras is 0")
