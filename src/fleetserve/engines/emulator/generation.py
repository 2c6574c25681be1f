"""Answering one completion on an emulated engine: how long the answer is and what it says (pseudo-text,
or JSON for a forced tool call or a response_format), its request in the engine model, and the body or
SSE stream vLLM would send for it, token outputs arriving from the driver as the model produces them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from fleetserve.engines.emulator.driver import EngineFailed
from fleetserve.engines.emulator.http import json_response
from fleetserve.engines.emulator.structured import json_from_schema, response_schema
from fleetserve.engines.emulator.text import (
    FixedText,
    PlannedOutput,
    PseudoText,
    plan_output,
    request_seed,
    words_until_stop,
)
from fleetserve.model.engine import RequestRejected
from fleetserve.model.types import EngineRequest, ExportedRequest, TokenOutput
from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError
from fleetserve.protocol.sse import DONE, sse_error, sse_event

if TYPE_CHECKING:
    from fleetserve.engines.emulator.engine import EmulatedEngine


def checked_token_ids(engine: EmulatedEngine, token_ids: list[int]) -> list[int]:
    vocab_size = engine.tokenizer.vocab_size
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise APIError(400, f"Token id {token_id} is out of vocabulary", param="prompt")
    return token_ids


def _answer(
    engine: EmulatedEngine,
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
        return _fixed(engine, json_from_schema(schema, seed, "tools"), limit, finish)
    schema = response_schema(body.response_format)
    if schema is not None:
        return _fixed(engine, json_from_schema(schema, seed, "response_format"), limit, "stop")
    plan = plan_output(
        seed, limit, min(body.min_tokens, limit), body.ignore_eos, engine.spec.natural_output_median
    )
    if body.stop_sequences or body.stop_token_ids:  # ignore_eos ignores EOS only, as in vLLM
        return words_until_stop(seed, plan, engine.vocabulary, body.stop_sequences, body.stop_token_ids or ())
    return plan, PseudoText(seed, engine.vocabulary.words)


def _fixed(
    engine: EmulatedEngine, value: Any, limit: int, finish_reason: str
) -> tuple[PlannedOutput, FixedText]:
    pieces = engine.tokenizer.pieces(orjson.dumps(value).decode())
    if len(pieces) > limit:
        return PlannedOutput(limit, "length"), FixedText(pieces[:limit])
    return PlannedOutput(len(pieces), finish_reason), FixedText(pieces)


@dataclass(frozen=True, slots=True)
class Imported:
    """A request migrating in (the `x-fleetserve-import` header of its continuation): how many tokens it
    has left and how it ends, as the engine it left had planned, and whether its KV came with it."""

    output_left: int
    finish_reason: str
    kv: bool

    @classmethod
    def from_header(cls, value: str) -> Imported:
        try:
            fields = orjson.loads(value)
            imported = cls(int(fields["output_left"]), str(fields["finish_reason"]), bool(fields["kv"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise APIError(
                400,
                'x-fleetserve-import must be {"output_left": N, "finish_reason": "...", "kv": true|false}',
                param="x-fleetserve-import",
            ) from None
        if imported.output_left < 1:
            raise APIError(
                400, "x-fleetserve-import: output_left must be at least 1", param="x-fleetserve-import"
            )
        return imported


def _continued(
    engine: EmulatedEngine, imported: Imported, seed: int, limit: int
) -> tuple[PlannedOutput, PseudoText]:
    """A migrated request ends where the engine it left had planned, unless its limit is nearer."""
    if imported.output_left > limit:
        return PlannedOutput(limit, "length"), PseudoText(seed, engine.vocabulary.words)
    return PlannedOutput(imported.output_left, imported.finish_reason), PseudoText(
        seed, engine.vocabulary.words
    )


def generate(
    engine: EmulatedEngine,
    body: openai.CompletionRequest | openai.ChatCompletionRequest,
    token_ids: list[int],
    kind: Literal["completion", "chat"],
    *,
    request_id: str | None = None,
    imported: Imported | None = None,
) -> Response:
    """`request_id` (vLLM's X-Request-Id) names the request in the engine, so that a router can find it
    in `/fleetserve/load` and export it; `imported` continues a request another engine exported."""
    adapter = engine.resolve_adapter(body.model)
    prompt_len = len(token_ids)
    if prompt_len >= engine.max_model_len:
        raise openai.prompt_too_long(engine.max_model_len, prompt_len)
    limit = body.output_limit
    if limit is None:
        limit = engine.max_model_len - prompt_len
    elif prompt_len + limit > engine.max_model_len:
        raise openai.output_too_long(engine.max_model_len, prompt_len, limit)
    seed = request_seed(token_ids, body.seed)
    tool = body.forced_tool() if isinstance(body, openai.ChatCompletionRequest) else None
    if imported is None:
        plan, text = _answer(engine, body, tool, seed, limit)
    else:
        plan, text = _continued(engine, imported, seed, limit)
    # moved KV: only the last token is computed again, and the blocks are its own (no prefix match)
    kv = imported is not None and imported.kv
    engine_request = EngineRequest(
        request_id or uuid.uuid4().hex,
        token_ids,
        plan.num_tokens,
        0.0,
        adapter=adapter,
        priority=body.priority,
        unique_prompt=kv,
        imported_tokens=prompt_len - 1 if kv else 0,
    )
    generation = Generation(engine, engine_request.request_id, prompt_len, plan, text)
    try:
        engine.driver.submit(engine_request, generation.sink)
    except RequestRejected as error:
        raise APIError(400, str(error)) from None
    except EngineFailed as error:
        raise APIError(500, str(error)) from None
    engine.generations[engine_request.request_id] = generation
    generation.arrival = engine_request.arrival_time
    stream = _Stream(
        kind=kind,
        response_id=openai.chat_completion_id() if kind == "chat" else openai.completion_id(),
        created=openai.now_created(),
        model=body.model or engine.served_model_name,
        prompt_len=prompt_len,
        include_usage=body.include_usage,
        continuous_usage=body.include_usage
        and bool(body.stream_options and body.stream_options.continuous_usage_stats),
        stream_interval=engine.spec.stream_interval,
        tool=None if tool is None else _ToolCall(openai.tool_call_id(), tool["name"]),
    )
    if body.stream:
        return _EventStream(stream.events(generation), generation)  # type: ignore[return-value]
    return _Unary(stream.collect(generation), generation)  # type: ignore[return-value]


_CANCELLED = object()


class Generation:
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
        self.exported = False  # it migrated to another engine
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
        self._owner.generations.pop(self.request_id, None)
        self._owner.driver.abort(self.request_id)
        self._owner.metrics.request_finished("abort")
        self._queue.put_nowait(_CANCELLED)

    def export(self) -> ExportedRequest | None:
        """Take the request off the engine to go on elsewhere: its stream sends every token made so far
        and ends without [DONE]. None (and nothing changes) when it is not decoding."""
        if self.finished or self._cancelled:
            return None
        exported = self._owner.driver.export(self.request_id)
        if exported is not None:
            self._cancelled = True
            self.exported = True
            self._owner.generations.pop(self.request_id, None)
            self._owner.metrics.request_finished("abort")  # as the source of a Llumnix migration counts it
            self._queue.put_nowait(_CANCELLED)
        return exported

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
            self._owner.generations.pop(self.request_id, None)
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

    async def events(self, generation: Generation) -> AsyncIterator[bytes]:
        """SSE bytes: one chunk per `stream_interval` tokens (the first token alone), even when the
        engine reports several tokens at once because the event loop ran late."""
        pending = 0
        emitted = 0
        try:
            while True:
                output = await generation.next_tokens()
                if output is None:
                    if generation.exported and pending:  # what it made here goes out before it moves
                        yield self._chunks(
                            generation.text.take(pending), None, emitted == 0, emitted + pending
                        )
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

    async def collect(self, generation: Generation) -> dict[str, Any] | None:
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


async def _cancel_on_disconnect(receive: Receive, generation: Generation) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            generation.cancel()
            return


class _EventStream:
    """An SSE response that aborts its request in the engine as soon as the client disconnects, even
    while the request is still queued and no chunk is being written."""

    def __init__(self, chunks: AsyncIterator[bytes], generation: Generation) -> None:
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

    def __init__(self, result: Awaitable[dict[str, Any] | None], generation: Generation) -> None:
        self._result = result
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, self._generation))
        try:
            body = await self._result
        except APIError as error:
            response: Response = json_response(error.body(), status=error.status)
        else:
            if body is None:
                return  # the client is gone; there is no one to answer
            response = json_response(body)
        finally:
            watcher.cancel()
            self._generation.cancel()
        await response(scope, receive, send)
