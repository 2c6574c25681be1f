"""What vLLM and SGLang serve besides the OpenAI API, which peer routers and operators call on a
worker: server and model info (SGLang's names, old and new), prefix-cache resets (vLLM's and SGLang's),
`/tokenize`, `/version`, and LoRA adapters loaded and unloaded at run time (vLLM's endpoints)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from fleetserve import __version__
from fleetserve.engines.emulator.http import json_response, render_chat
from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError, error_body

if TYPE_CHECKING:
    from fleetserve.engines.emulator.engine import EmulatedEngine

FLUSH_CACHE_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


def compat_routes(engine: EmulatedEngine) -> list[Route]:
    async def version(request: Request) -> Response:
        return json_response({"version": __version__})

    async def get_server_info(request: Request) -> Response:
        return json_response(server_info(engine))

    async def get_model_info(request: Request) -> Response:
        return json_response(model_info(engine))

    async def reset_prefix_cache(request: Request) -> Response:
        # vLLM answers 200 with an empty body, and 409 when running requests hold blocks. Its
        # `reset_running_requests=true` (preempt them first) is not emulated: the answer is still 409.
        if not engine.reset_prefix_cache():
            return json_response(error_body(409, "Prefix cache reset failed.", error_type="Conflict"), 409)
        return Response(status_code=200)

    async def flush_cache(request: Request) -> Response:
        # SGLang flushes only when no request is running or waiting, and answers the same text either way
        flushed = engine.reset_prefix_cache(require_idle=True)
        return PlainTextResponse(FLUSH_CACHE_TEXT, status_code=200 if flushed else 400)

    async def tokenize(request: Request) -> Response:
        body = openai.json_object(await request.body())
        if not isinstance(body.get("model"), str | None):
            raise APIError(400, "model must be a string", param="model")
        engine.resolve_adapter(body.get("model"))
        if isinstance(body.get("prompt"), str):
            tokens = engine.tokenizer.encode(body["prompt"])
        elif isinstance(body.get("messages"), list):
            chat = openai.parse_chat_request(orjson.dumps({"messages": body["messages"]}))
            tokens = engine.tokenizer.encode(render_chat(chat))
        else:
            raise APIError(400, "Either 'prompt' (a string) or 'messages' must be provided.", param="prompt")
        return json_response(
            {
                "count": len(tokens),
                "max_model_len": engine.max_model_len,
                "tokens": tokens,
                "token_strs": None,
            }
        )

    async def load_lora_adapter(request: Request) -> Response:
        body = openai.json_object(await request.body())
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path or not isinstance(name, str) or not isinstance(path, str):
            raise APIError(
                400, "Both 'lora_name' and 'lora_path' must be provided.", error_type="InvalidUserInput"
            )
        engine.load_adapter(name, path)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(request: Request) -> Response:
        body = openai.json_object(await request.body())
        name = body.get("lora_name")
        if not name or not isinstance(name, str):
            raise APIError(
                400,
                "either 'lora_name' and 'lora_int_id' needs to be provided.",
                error_type="InvalidUserInput",
            )
        engine.unload_adapter(name)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    return [
        Route("/version", version, methods=["GET"]),
        Route("/get_server_info", get_server_info, methods=["GET"]),
        Route("/server_info", get_server_info, methods=["GET"]),
        Route("/get_model_info", get_model_info, methods=["GET"]),
        Route("/model_info", get_model_info, methods=["GET"]),
        Route("/reset_prefix_cache", reset_prefix_cache, methods=["POST"]),
        Route("/flush_cache", flush_cache, methods=["GET", "POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
    ]


def server_info(engine: EmulatedEngine) -> dict[str, Any]:
    """SGLang's `/server_info` body: its server args, its scheduler info, `internal_states` (one per
    data-parallel rank) and `version`, reduced to the fields that have an equivalent here. Routers read
    `model_path` (the model id is its last path segment), `dp_size` and the capacity fields.
    `model_path` is the served name, never a path, and there is no `tokenizer_path`: a router given one
    tries to load that tokenizer, and an emulated engine has none to offer."""
    args = engine.spec.engine_args
    metrics = engine.engine.metrics
    kv_tokens = metrics.num_gpu_blocks * metrics.block_size
    return {
        "model_path": engine.served_model_name,
        "served_model_name": engine.served_model_name,
        "context_length": engine.max_model_len,
        "tp_size": engine.spec.tp,
        "dp_size": 1,
        "pp_size": 1,
        "max_running_requests": args.max_num_seqs,
        "max_total_tokens": kv_tokens,
        "max_prefill_tokens": args.max_num_batched_tokens,
        # SGLang's -1 means chunked prefill is off
        "chunked_prefill_size": args.max_num_batched_tokens if args.enable_chunked_prefill else -1,
        "page_size": metrics.block_size,
        "schedule_policy": args.scheduling_policy,
        "mem_fraction_static": args.gpu_memory_utilization,
        "disable_radix_cache": not args.enable_prefix_caching,
        "enable_lora": args.max_loras > 0,
        "max_loras_per_batch": args.max_loras,
        "max_lora_rank": args.max_lora_rank,
        "stream_interval": engine.spec.stream_interval,
        "disaggregation_mode": "null",
        "max_total_num_tokens": kv_tokens,
        "max_req_input_len": engine.max_model_len - 1,
        "internal_states": [
            {
                "memory_usage": {"token_capacity": kv_tokens},
                "waiting_queue_size": metrics.num_waiting,
                "running_batch_size": metrics.num_running,
            }
        ],
        "version": __version__,
    }


def model_info(engine: EmulatedEngine) -> dict[str, Any]:
    """SGLang's `/model_info` body. `tokenizer_path` is null (see `server_info`): the routers read it
    only when it is a non-empty string."""
    return {
        "model_path": engine.served_model_name,
        "tokenizer_path": None,
        "served_model_name": engine.served_model_name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "has_image_understanding": False,
        "has_audio_understanding": False,
    }
