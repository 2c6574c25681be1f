"""One emulated engine: the engine model on the wall clock behind vLLM's OpenAI-compatible HTTP API.

`EmulatedEngine(spec)` builds the engine model from the catalogs, the driver, the metrics registry and
(optionally) the KV-event publisher; `.app` is its ASGI application. Start it with `await engine.start()`
inside the event loop that serves `.app`, and stop it with `await engine.stop()`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fleetserve import __version__
from fleetserve.config import EngineArgs
from fleetserve.engines.emulator.driver import EngineDriver, EngineFailed
from fleetserve.engines.emulator.kv_events import EventFormat, KVEventPublisher
from fleetserve.engines.emulator.metrics import CONTENT_TYPE, CacheConfig, EmulatorMetrics, EngineState
from fleetserve.engines.emulator.structured import json_from_schema, response_schema
from fleetserve.engines.emulator.text import (
    FixedText,
    PlannedOutput,
    PseudoText,
    Vocabulary,
    plan_output,
    request_seed,
    words_until_stop,
)
from fleetserve.errors import InputError
from fleetserve.model.catalog import Catalog, default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.model.engine import EngineModel, RequestRejected, SchedulerConfig
from fleetserve.model.types import EngineRequest, StepResult, TokenOutput
from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError, error_body
from fleetserve.protocol.sse import DONE, sse_error, sse_event
from fleetserve.protocol.tokenizer import chat_prompt, load_tokenizer

DEFAULT_NATURAL_OUTPUT_MEDIAN = 128.0
_FLUSH_CACHE_TEXT = (
    "Cache flushed.\nPlease check backend logs for more details. "
    "(When there are running or waiting requests, the operation will not be performed.)\n"
)


@dataclass(frozen=True)
class KVEventsSpec:
    endpoint: str
    replay_endpoint: str | None = None
    topic: str = ""
    event_format: EventFormat = "array"


@dataclass(frozen=True)
class EmulatorSpec:
    """Everything that defines one emulated engine (the CLI flags, or one replica of a fleet file)."""

    gpu: str
    model: str
    tp: int = 1
    engine_id: str | None = None
    served_model_name: str | None = None
    engine_args: EngineArgs = field(default_factory=EngineArgs)
    time_scale: float = 1.0
    stream_interval: int = 1
    max_model_len: int | None = None
    tokenizer_file: str | None = None
    lora_modules: tuple[tuple[str, str], ...] = ()  # (name, path) loaded at start
    kv_events: KVEventsSpec | None = None
    natural_output_median: float = DEFAULT_NATURAL_OUTPUT_MEDIAN
    catalog_file: str | None = None


class EmulatedEngine:
    def __init__(self, spec: EmulatorSpec, catalog: Catalog | None = None) -> None:
        if spec.stream_interval < 1:
            raise InputError(f"stream_interval must be at least 1, got {spec.stream_interval}")
        catalog = catalog or (Catalog.load(spec.catalog_file) if spec.catalog_file else default_catalog())
        self.spec = spec
        self.model_spec = catalog.model(spec.model)
        self.gpu_spec = catalog.gpu(spec.gpu)
        self.served_model_name = spec.served_model_name or spec.model
        self.engine_id = spec.engine_id or self.served_model_name
        self.max_model_len = min(
            spec.max_model_len or self.model_spec.max_context, self.model_spec.max_context
        )
        self.cost = CostModel(self.gpu_spec, self.model_spec, spec.tp)
        self.engine = EngineModel(self.cost, SchedulerConfig.from_args(spec.engine_args))
        self.tokenizer = load_tokenizer(self.model_spec.vocab_size, spec.tokenizer_file)
        self.vocabulary = Vocabulary.for_tokenizer(self.tokenizer)
        self.driver = EngineDriver(self.engine, spec.time_scale, on_step=self._on_step)
        engine_metrics = self.engine.metrics
        self.metrics = EmulatorMetrics(
            self.served_model_name,
            CacheConfig(
                block_size=engine_metrics.block_size,
                num_gpu_blocks=engine_metrics.num_gpu_blocks,
                gpu_memory_utilization=spec.engine_args.gpu_memory_utilization,
                enable_prefix_caching=spec.engine_args.enable_prefix_caching,
            ),
            max_lora=spec.engine_args.max_loras,
            state=self._engine_state,
        )
        self.adapters: dict[str, str] = {}  # name -> path, in load order
        self.publisher: KVEventPublisher | None = None
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/health", self._health, methods=["GET"]),
                Route("/ping", self._health, methods=["GET", "POST"]),
                Route("/version", self._version, methods=["GET"]),
                # what peer routers ask a worker (SGLang's names, old and new; vLLM's cache reset)
                Route("/get_server_info", self._server_info, methods=["GET"]),
                Route("/server_info", self._server_info, methods=["GET"]),
                Route("/get_model_info", self._model_info, methods=["GET"]),
                Route("/model_info", self._model_info, methods=["GET"]),
                Route("/reset_prefix_cache", self._reset_prefix_cache, methods=["POST"]),
                Route("/flush_cache", self._flush_cache, methods=["GET", "POST"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/tokenize", self._tokenize, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/chat/completions", self._chat_completions, methods=["POST"]),
                Route("/v1/load_lora_adapter", self._load_lora_adapter, methods=["POST"]),
                Route("/v1/unload_lora_adapter", self._unload_lora_adapter, methods=["POST"]),
            ],
            exception_handlers={404: _not_found, 405: _method_not_allowed},
        )

    async def start(self) -> None:
        if self.spec.kv_events is not None:
            events = self.spec.kv_events
            self.publisher = KVEventPublisher(
                events.endpoint, events.replay_endpoint, topic=events.topic, event_format=events.event_format
            )
            self.publisher.start()
        self.driver.start()
        for name, path in self.spec.lora_modules:
            self.load_adapter(name, path)

    async def stop(self) -> None:
        await self.driver.stop()
        if self.publisher is not None:
            await self.publisher.close()

    # engine plumbing

    def _on_step(self, result: StepResult) -> None:
        if self.publisher is not None and result.kv_events:
            self.publisher.publish(result.kv_events)

    def _engine_state(self) -> EngineState:
        metrics = self.engine.metrics
        return EngineState(
            num_running=metrics.num_running,
            num_waiting=metrics.num_waiting,
            kv_usage=metrics.kv_usage,
            prefix_cache_queries=metrics.prefix_cache_queries,
            prefix_cache_hits=metrics.prefix_cache_hits,
            num_preemptions=metrics.num_preemptions,
            running_adapters=metrics.running_lora_adapters,
            waiting_adapters=metrics.waiting_lora_adapters,
        )

    def load_adapter(self, name: str, path: str) -> None:
        if name in self.adapters or name == self.served_model_name:
            raise APIError(
                400, f"The lora adapter '{name}' has already been loaded.", error_type="InvalidUserInput"
            )
        try:
            self.driver.apply(lambda now: self.engine.load_adapter(name, now))
        except InputError as error:
            raise APIError(400, str(error), error_type="BadRequestError") from None
        self.adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", error_type="NotFoundError")
        try:
            self.driver.apply(lambda now: self.engine.unload_adapter(name))
        except InputError as error:
            raise APIError(400, str(error), error_type="BadRequestError") from None
        del self.adapters[name]

    def reset_prefix_cache(self, require_idle: bool = False) -> bool:
        """Forget every cached prompt block, as vLLM's `reset_prefix_cache()`: False (and nothing changes)
        while a request holds KV blocks, or with `require_idle` (SGLang's rule) while any request is
        running or waiting. The `AllBlocksCleared` event goes out at once, not with the next iteration, so
        a subscribed router drops its view of this engine's cache together with the engine."""

        def reset(now: float) -> bool:
            if require_idle:
                metrics = self.engine.metrics
                if metrics.num_running or metrics.num_waiting:
                    return False
            done = self.engine.reset_prefix_cache()
            kv = self.engine.kv
            if kv.has_events:
                events = kv.take_events()
                if self.publisher is not None:
                    self.publisher.publish(events)
            return done

        return self.driver.apply(reset)

    def server_info(self) -> dict[str, Any]:
        """SGLang's `/server_info` body: its server args, its scheduler info, `internal_states` (one per
        data-parallel rank) and `version`, reduced to the fields that have an equivalent here. Routers read
        `model_path` (the model id is its last path segment), `dp_size` and the capacity fields.
        `model_path` is the served name, never a path, and there is no `tokenizer_path`: a router given one
        tries to load that tokenizer, and an emulated engine has none to offer."""
        args = self.spec.engine_args
        metrics = self.engine.metrics
        kv_tokens = metrics.num_gpu_blocks * metrics.block_size
        return {
            "model_path": self.served_model_name,
            "served_model_name": self.served_model_name,
            "context_length": self.max_model_len,
            "tp_size": self.spec.tp,
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
            "stream_interval": self.spec.stream_interval,
            "disaggregation_mode": "null",
            "max_total_num_tokens": kv_tokens,
            "max_req_input_len": self.max_model_len - 1,
            "internal_states": [
                {
                    "memory_usage": {"token_capacity": kv_tokens},
                    "waiting_queue_size": metrics.num_waiting,
                    "running_batch_size": metrics.num_running,
                }
            ],
            "version": __version__,
        }

    def model_info(self) -> dict[str, Any]:
        """SGLang's `/model_info` body. `tokenizer_path` is null (see `server_info`): the routers read it
        only when it is a non-empty string."""
        return {
            "model_path": self.served_model_name,
            "tokenizer_path": None,
            "served_model_name": self.served_model_name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
        }

    def _resolve_adapter(self, model: str | None) -> str | None:
        """The adapter a request names; None for the base model. Unknown names get vLLM's 404."""
        if model is None or model == self.served_model_name:
            return None
        if model in self.adapters:
            return model
        raise openai.model_not_found(model)

    # HTTP handlers

    async def _health(self, request: Request) -> Response:
        if self.driver.failure is not None:
            return _json(error_body(500, str(self.driver.failure)), status=500)
        return Response(status_code=200)

    async def _version(self, request: Request) -> Response:
        return _json({"version": __version__})

    async def _server_info(self, request: Request) -> Response:
        return _json(self.server_info())

    async def _model_info(self, request: Request) -> Response:
        return _json(self.model_info())

    async def _reset_prefix_cache(self, request: Request) -> Response:
        # vLLM answers 200 with an empty body, and 409 when running requests hold blocks. Its
        # `reset_running_requests=true` (preempt them first) is not emulated: the answer is still 409.
        if not self.reset_prefix_cache():
            return _json(error_body(409, "Prefix cache reset failed.", error_type="Conflict"), status=409)
        return Response(status_code=200)

    async def _flush_cache(self, request: Request) -> Response:
        # SGLang flushes only when no request is running or waiting, and answers the same text either way
        flushed = self.reset_prefix_cache(require_idle=True)
        return PlainTextResponse(_FLUSH_CACHE_TEXT, status_code=200 if flushed else 400)

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def _models(self, request: Request) -> Response:
        base = openai.model_card(
            self.served_model_name,
            self.model_spec.hf_id or self.model_spec.name,
            self.created,
            max_model_len=self.max_model_len,
        )
        adapters = [
            openai.model_card(name, path, self.created, parent=self.served_model_name)
            for name, path in self.adapters.items()
        ]
        return _json(openai.model_list([base, *adapters]))

    async def _tokenize(self, request: Request) -> Response:
        async def handle() -> Response:
            body = _json_object(await request.body())
            if not isinstance(body.get("model"), str | None):
                raise APIError(400, "model must be a string", param="model")
            self._resolve_adapter(body.get("model"))
            if isinstance(body.get("prompt"), str):
                tokens = self.tokenizer.encode(body["prompt"])
            elif isinstance(body.get("messages"), list):
                chat = openai.parse_chat_request(orjson.dumps({"messages": body["messages"]}))
                tokens = self.tokenizer.encode(_render_chat(chat))
            else:
                raise APIError(
                    400, "Either 'prompt' (a string) or 'messages' must be provided.", param="prompt"
                )
            return _json(
                {
                    "count": len(tokens),
                    "max_model_len": self.max_model_len,
                    "tokens": tokens,
                    "token_strs": None,
                }
            )

        return await _guarded(handle)

    async def _load_lora_adapter(self, request: Request) -> Response:
        async def handle() -> Response:
            body = _json_object(await request.body())
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path or not isinstance(name, str) or not isinstance(path, str):
                raise APIError(
                    400, "Both 'lora_name' and 'lora_path' must be provided.", error_type="InvalidUserInput"
                )
            self.load_adapter(name, path)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        return await _guarded(handle)

    async def _unload_lora_adapter(self, request: Request) -> Response:
        async def handle() -> Response:
            body = _json_object(await request.body())
            name = body.get("lora_name")
            if not name or not isinstance(name, str):
                raise APIError(
                    400,
                    "either 'lora_name' and 'lora_int_id' needs to be provided.",
                    error_type="InvalidUserInput",
                )
            self.unload_adapter(name)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        return await _guarded(handle)

    async def _completions(self, request: Request) -> Response:
        async def handle() -> Response:
            completion = openai.parse_completion_request(await request.body())
            prompt = completion.prompt
            if isinstance(prompt, str):
                token_ids = self.tokenizer.encode(prompt)
            else:
                token_ids = self._checked_token_ids(prompt)  # type: ignore[arg-type]
            return self._generate(request, completion, token_ids, "completion")

        return await _guarded(handle)

    async def _chat_completions(self, request: Request) -> Response:
        async def handle() -> Response:
            chat = openai.parse_chat_request(await request.body())
            return self._generate(request, chat, self.tokenizer.encode(_render_chat(chat)), "chat")

        return await _guarded(handle)

    # generation

    def _checked_token_ids(self, token_ids: list[int]) -> list[int]:
        vocab_size = self.tokenizer.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab_size:
                raise APIError(400, f"Token id {token_id} is out of vocabulary", param="prompt")
        return token_ids

    def _answer(
        self,
        body: openai.CompletionRequest | openai.ChatCompletionRequest,
        tool: dict[str, Any] | None,
        seed: int,
        limit: int,
    ) -> tuple[PlannedOutput, PseudoText | FixedText]:
        """How many tokens the answer has and its text: JSON for a forced tool call or a response_format
        (cut at the output limit, as guided decoding is), else pseudo-text of a natural length that ends
        at the first stop string or stop token."""
        if tool is not None:
            schema = tool.get("parameters") or {"type": "object"}
            # vLLM: "tool_calls" when the model had to call some tool, "stop" when the client named it
            finish = "tool_calls" if body.tool_choice == "required" else "stop"
            return self._fixed(json_from_schema(schema, seed, "tools"), limit, finish)
        schema = response_schema(body.response_format)
        if schema is not None:
            return self._fixed(json_from_schema(schema, seed, "response_format"), limit, "stop")
        plan = plan_output(
            seed, limit, min(body.min_tokens, limit), body.ignore_eos, self.spec.natural_output_median
        )
        if body.stop_sequences or body.stop_token_ids:  # ignore_eos ignores EOS only, as in vLLM
            return words_until_stop(
                seed, plan, self.vocabulary, body.stop_sequences, body.stop_token_ids or ()
            )
        return plan, PseudoText(seed, self.vocabulary.words)

    def _fixed(self, value: Any, limit: int, finish_reason: str) -> tuple[PlannedOutput, FixedText]:
        pieces = self.tokenizer.pieces(orjson.dumps(value).decode())
        if len(pieces) > limit:
            return PlannedOutput(limit, "length"), FixedText(pieces[:limit])
        return PlannedOutput(len(pieces), finish_reason), FixedText(pieces)

    def _generate(
        self,
        request: Request,
        body: openai.CompletionRequest | openai.ChatCompletionRequest,
        token_ids: list[int],
        kind: Literal["completion", "chat"],
    ) -> Response:
        adapter = self._resolve_adapter(body.model)
        prompt_len = len(token_ids)
        if prompt_len >= self.max_model_len:
            raise openai.prompt_too_long(self.max_model_len, prompt_len)
        limit = body.output_limit
        if limit is None:
            limit = self.max_model_len - prompt_len
        elif prompt_len + limit > self.max_model_len:
            raise openai.output_too_long(self.max_model_len, prompt_len, limit)
        seed = request_seed(token_ids, body.seed)
        tool = body.forced_tool() if isinstance(body, openai.ChatCompletionRequest) else None
        plan, text = self._answer(body, tool, seed, limit)
        request_id = uuid.uuid4().hex
        engine_request = EngineRequest(
            request_id, token_ids, plan.num_tokens, 0.0, adapter=adapter, priority=body.priority
        )
        generation = _Generation(self, request_id, prompt_len, plan, text)
        try:
            self.driver.submit(engine_request, generation.sink)
        except RequestRejected as error:
            raise APIError(400, str(error)) from None
        except EngineFailed as error:
            raise APIError(500, str(error)) from None
        generation.arrival = engine_request.arrival_time
        stream = _Stream(
            kind=kind,
            response_id=openai.chat_completion_id() if kind == "chat" else openai.completion_id(),
            created=openai.now_created(),
            model=body.model or self.served_model_name,
            prompt_len=prompt_len,
            include_usage=body.include_usage,
            continuous_usage=body.include_usage
            and bool(body.stream_options and body.stream_options.continuous_usage_stats),
            stream_interval=self.spec.stream_interval,
            tool=None if tool is None else _ToolCall(openai.tool_call_id(), tool["name"]),
        )
        if body.stream:
            return _EventStream(stream.events(generation), generation)  # type: ignore[return-value]
        return _Unary(stream.collect(generation), generation)  # type: ignore[return-value]


_CANCELLED = object()


class _Generation:
    """One request's progress: its queue of token outputs, its pseudo-text and its metrics."""

    def __init__(
        self,
        owner: EmulatedEngine,
        request_id: str,
        prompt_len: int,
        plan: PlannedOutput,
        text: PseudoText | FixedText,
    ) -> None:
        self._owner = owner
        self.request_id = request_id
        self.prompt_len = prompt_len
        self.plan = plan
        self.text = text
        self.arrival = 0.0  # model time, set once the driver accepted the request
        self.num_tokens = 0
        self.finished = False
        self._cancelled = False
        self._last_token_time = 0.0
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def sink(self, item: TokenOutput | EngineFailed) -> None:
        # metrics follow the engine, not the client: observe when the engine produces the tokens
        if isinstance(item, TokenOutput):
            self._observe(item)
        self._queue.put_nowait(item)

    def cancel(self) -> None:
        """The client went away: free the request's blocks in the engine."""
        if self.finished or self._cancelled:
            return
        self._cancelled = True
        self._owner.driver.abort(self.request_id)
        self._owner.metrics.request_finished("abort")
        self._queue.put_nowait(_CANCELLED)

    async def next_tokens(self) -> TokenOutput | None:
        """The next output, or None once cancelled. Raises APIError if the engine model failed."""
        item = await self._queue.get()
        if item is _CANCELLED:
            return None
        if isinstance(item, EngineFailed):
            self.finished = True
            raise APIError(500, str(item))
        assert isinstance(item, TokenOutput)
        return item

    def _observe(self, output: TokenOutput) -> None:
        metrics = self._owner.metrics
        wall = self._owner.driver.to_wall_seconds
        if self.num_tokens == 0:
            metrics.time_to_first_token.observe(wall(output.first_token_time - self.arrival))
            metrics.request_queue_time.observe(wall(self._queue_time(output)))
            metrics.prompt_tokens.inc(self.prompt_len)
        else:
            metrics.inter_token_latency.observe(wall(output.first_token_time - self._last_token_time))
        if output.num_tokens > 1:
            gap = wall((output.last_token_time - output.first_token_time) / (output.num_tokens - 1))
            for _ in range(output.num_tokens - 1):
                metrics.inter_token_latency.observe(gap)
        metrics.generation_tokens.inc(output.num_tokens)
        self.num_tokens += output.num_tokens
        self._last_token_time = output.last_token_time
        if output.finished:
            self.finished = True
            metrics.e2e_request_latency.observe(wall(output.last_token_time - self.arrival))
            # vLLM's metrics know "stop" and "length"; a tool call ends like any answer the model stopped
            finish = self.plan.finish_reason
            metrics.request_finished("stop" if finish == "tool_calls" else finish)

    def _queue_time(self, first: TokenOutput) -> float:
        """Time from arrival to the start of prefill, estimated as TTFT minus the prefill of the uncached
        prompt run alone (the engine model does not report when a request was first scheduled)."""
        cached = first.num_cached_prompt_tokens
        prefill = self._owner.cost.iteration_time([(self.prompt_len - cached, cached)], [])
        return max(0.0, first.first_token_time - self.arrival - prefill)


@dataclass(frozen=True)
class _ToolCall:
    """A forced tool call: its id and function name; the arguments are the answer's text."""

    call_id: str
    name: str

    def delta(self, arguments: str, *, first: bool) -> dict[str, Any]:
        if first:
            return {"index": 0, **self.whole(arguments)}
        return {"index": 0, "function": {"arguments": arguments}}

    def whole(self, arguments: str) -> dict[str, Any]:
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }


@dataclass
class _Stream:
    """Turns token outputs into vLLM's response bodies and SSE chunks."""

    kind: Literal["completion", "chat"]
    response_id: str
    created: int
    model: str
    prompt_len: int
    include_usage: bool
    continuous_usage: bool
    stream_interval: int
    tool: _ToolCall | None = None  # the answer is this tool call's arguments

    async def events(self, generation: _Generation) -> AsyncIterator[bytes]:
        """SSE bytes: one chunk per `stream_interval` tokens (the first token alone), even when the
        engine reports several tokens at once because the event loop ran late."""
        pending = 0
        emitted = 0
        try:
            while True:
                output = await generation.next_tokens()
                if output is None:
                    return
                pending += output.num_tokens
                sizes = []
                if emitted == 0:
                    sizes.append(1)
                    pending -= 1
                while pending >= self.stream_interval:
                    sizes.append(self.stream_interval)
                    pending -= self.stream_interval
                if output.finished and pending:
                    sizes.append(pending)
                    pending = 0
                chunks = []
                for index, size in enumerate(sizes):
                    last = output.finished and index == len(sizes) - 1
                    chunks.append(
                        self._chunks(
                            generation.text.take(size),
                            generation.plan if last else None,
                            emitted == 0,
                            emitted + size,
                        )
                    )
                    emitted += size
                if chunks:
                    yield b"".join(chunks)
                if output.finished:
                    break
        except APIError as error:
            yield sse_error(error.status, error.message, error.error_type)
            yield DONE
            return
        if self.include_usage:
            usage = openai.usage(self.prompt_len, generation.num_tokens)
            obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
            yield sse_event(openai.usage_chunk(obj, self.response_id, self.created, self.model, usage))
        yield DONE

    def _chunks(self, text: str, plan: PlannedOutput | None, first: bool, tokens_so_far: int) -> bytes:
        """The SSE events of one piece of the answer; `plan` only with the last piece."""
        finish_reason = None if plan is None else plan.finish_reason
        stop_reason = None if plan is None else plan.stop_reason
        if self.kind == "chat":
            chunks = []
            if first:
                chunks.append(self._chat_chunk({"role": "assistant", "content": ""}, None, 0))
            if self.tool is None:
                delta: dict[str, Any] = {"content": text}
            else:  # vLLM names the function in the first tool delta, then streams its arguments
                delta = {"tool_calls": [self.tool.delta(text, first=first)]}
            chunks.append(self._chat_chunk(delta, finish_reason, tokens_so_far))
            return b"".join(chunks)
        chunk = openai.completion_chunk(
            self.response_id, self.created, self.model, text, finish_reason, stop_reason
        )
        if self.continuous_usage:
            chunk["usage"] = openai.usage(self.prompt_len, tokens_so_far)
        return sse_event(chunk)

    def _chat_chunk(self, delta: dict[str, Any], finish_reason: str | None, tokens_so_far: int) -> bytes:
        chunk = openai.chat_chunk(self.response_id, self.created, self.model, delta, finish_reason)
        if self.continuous_usage:
            chunk["usage"] = openai.usage(self.prompt_len, tokens_so_far)
        return sse_event(chunk)

    async def collect(self, generation: _Generation) -> dict[str, Any] | None:
        """The whole non-streamed response, or None if the client went away first."""
        while True:
            output = await generation.next_tokens()
            if output is None:
                return None
            if output.finished:
                break
        text = generation.text.take(generation.num_tokens)
        usage = openai.usage(self.prompt_len, generation.num_tokens)
        plan = generation.plan
        if self.kind == "chat":
            return openai.chat_response(
                self.response_id,
                self.created,
                self.model,
                None if self.tool is not None else text,
                plan.finish_reason,
                usage,
                stop_reason=plan.stop_reason,
                tool_calls=[] if self.tool is None else [self.tool.whole(text)],
            )
        return openai.completion_response(
            self.response_id, self.created, self.model, text, plan.finish_reason, usage, plan.stop_reason
        )


async def _cancel_on_disconnect(receive: Receive, generation: _Generation) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


class _EventStream:
    """An SSE response that aborts its request in the engine as soon as the client disconnects, even
    while the request is still queued and no chunk is being written."""

    def __init__(self, chunks: AsyncIterator[bytes], generation: _Generation) -> None:
        self._chunks = chunks
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                ],
            }
        )
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, self._generation))
        try:
            async for chunk in self._chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self._generation.cancel()


class _Unary:
    """A JSON response produced when the request finishes; aborted if the client disconnects first."""

    def __init__(self, result: Awaitable[dict[str, Any] | None], generation: _Generation) -> None:
        self._result = result
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, self._generation))
        try:
            body = await self._result
        except APIError as error:
            response: Response = _json(error.body(), status=error.status)
        else:
            if body is None:
                return  # the client is gone; there is no one to answer
            response = _json(body)
        finally:
            watcher.cancel()
            self._generation.cancel()
        await response(scope, receive, send)


# helpers


def _render_chat(chat: openai.ChatCompletionRequest) -> str:
    return chat_prompt([(message.role, message.text()) for message in chat.messages])


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise APIError(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return data


async def _guarded(handle: Callable[[], Awaitable[Response]]) -> Response:
    """Every failure leaves as OpenAI-shaped JSON, never as a bare 500 page."""
    try:
        return await handle()
    except APIError as error:
        return _json(error.body(), status=error.status)
    except Exception as error:  # a bug must still reach the client in the API's error shape
        return _json(error_body(500, f"internal error: {error!r}"), status=500)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _json(error_body(404, f"{request.url.path} not found", error_type="NotFoundError"), status=404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return _json(
        error_body(405, f"Method {request.method} not allowed", error_type="MethodNotAllowed"), status=405
    )
