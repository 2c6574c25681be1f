"""One streaming OpenAI request, timed. Every outcome becomes a `RequestRecord`; nothing raises.

Timing follows vLLM's serving benchmark: TTFT is the time from sending the request to the first chunk
that carries generated text, each later text chunk adds one inter-token latency (ITL), and E2E ends at
`data: [DONE]`. A chunk may carry several tokens; ITLs are per chunk, as a client sees them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import orjson

from fleetserve.errors import InternalError
from fleetserve.protocol.sse import SSEDecoder

Endpoint = Literal["chat", "completions"]

ENDPOINT_PATHS: dict[Endpoint, str] = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}

# Failure kinds besides `http_<status>`. A request fails with exactly one kind.
CONNECT_ERROR = "connect_error"  # no HTTP response: refused, reset or closed before the status line
TIMEOUT = "timeout"  # the per-request deadline passed
STREAM_ERROR = "stream_error"  # the server sent an `{"error": ...}` event inside the stream
INCOMPLETE_STREAM = "incomplete_stream"  # the stream ended (or broke) before `data: [DONE]`
EMPTY_STREAM = "empty_stream"  # `[DONE]` arrived but no generated text did
BAD_PAYLOAD = "bad_payload"  # an event that is not JSON


@dataclass(frozen=True, slots=True)
class BenchRequest:
    index: int
    prompt: str
    input_tokens: int  # the length the prompt was built for; the server's count may differ slightly
    max_tokens: int
    model: str
    tenant: str | None = None  # sent as x-fleetserve-tenant (a gateway without required keys honours it)


@dataclass(slots=True)
class RequestRecord:
    index: int
    input_tokens: int
    requested_output_tokens: int
    scheduled_at: float  # seconds since the run started, when the schedule wanted the request sent
    sent_at: float = 0.0
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    usage_reported: bool = False
    failure: str | None = None
    status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, as vLLM defines it."""
        if not self.ok or self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def fail(self, kind: str, error: str, status: int | None = None) -> None:
        self.failure, self.error, self.status = kind, error[:500], status


def request_body(request: BenchRequest, endpoint: Endpoint) -> dict[str, object]:
    body: dict[str, object] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        # vLLM (and llama.cpp) extension: generate exactly max_tokens, so lengths follow the workload.
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


class StreamingClient:
    """Sends benchmark requests over one shared aiohttp session (one connection pool, no limit on it:
    the schedule, not the pool, decides how many requests are in flight)."""

    def __init__(
        self,
        base_url: str,
        endpoint: Endpoint = "completions",
        timeout_s: float = 600.0,
        api_key: str | None = None,
    ) -> None:
        self.url = base_url.rstrip("/").removesuffix("/v1") + ENDPOINT_PATHS[endpoint]
        self.endpoint: Endpoint = endpoint
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamingClient:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, request: BenchRequest, record: RequestRecord, run_start: float) -> RequestRecord:
        """Sends `request` now and fills `record` in. Never raises except on cancellation."""
        if self._session is None:
            raise InternalError("StreamingClient must be used as an async context manager")
        payload = orjson.dumps(request_body(request, self.endpoint))
        start = time.perf_counter()
        record.sent_at = start - run_start
        try:
            headers = None if request.tenant is None else {"x-fleetserve-tenant": request.tenant}
            async with self._session.post(
                self.url, data=payload, timeout=self._timeout, headers=headers
            ) as response:
                record.status = response.status
                if response.status != 200:
                    text = await response.text(errors="replace")
                    record.fail(f"http_{response.status}", text, response.status)
                    return record
                await read_stream(response.content.iter_any(), record, start)
        except TimeoutError:
            record.fail(TIMEOUT, "request exceeded its timeout", record.status)
        except (aiohttp.ClientError, OSError) as error:
            # Before the status line nothing was served; after it, the stream broke off.
            kind = INCOMPLETE_STREAM if record.status is not None else CONNECT_ERROR
            record.fail(kind, f"{type(error).__name__}: {error}", record.status)
        return record


async def read_stream(chunks: AsyncIterable[bytes], record: RequestRecord, start: float) -> None:
    """Reads an OpenAI SSE stream (split into `chunks` anywhere) into `record`; `start` is the
    `time.perf_counter()` at which the request was sent."""
    decoder = SSEDecoder()
    chunks_with_text = 0
    last_text_at = start
    done_at: float | None = None
    # Read to EOF even after [DONE] so that aiohttp can keep the connection alive for the next request.
    async for raw in chunks:
        if done_at is not None:
            continue
        now = time.perf_counter()
        for data in decoder.feed(raw):
            if data == b"[DONE]":
                done_at = now
                break
            try:
                event = orjson.loads(data)
            except orjson.JSONDecodeError:
                record.fail(BAD_PAYLOAD, data.decode(errors="replace"), record.status)
                return
            if not isinstance(event, dict):
                record.fail(BAD_PAYLOAD, data.decode(errors="replace"), record.status)
                return
            if event.get("error"):
                record.fail(STREAM_ERROR, _error_message(event["error"]), record.status)
                return
            if _has_text(event):
                if chunks_with_text == 0:
                    record.ttft = now - start
                else:
                    record.itls.append(now - last_text_at)
                last_text_at = now
                chunks_with_text += 1
            usage = event.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                record.output_tokens = usage["completion_tokens"]
                record.usage_reported = True
    record.e2e = (done_at if done_at is not None else time.perf_counter()) - start
    if not record.usage_reported:
        record.output_tokens = chunks_with_text
    if done_at is None:
        record.fail(INCOMPLETE_STREAM, "stream ended before data: [DONE]", record.status)
    elif chunks_with_text == 0:
        record.fail(EMPTY_STREAM, "stream finished without generated text", record.status)


def _has_text(event: dict[str, object]) -> bool:
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    choice = choices[0]
    if not isinstance(choice, dict):
        return False
    if choice.get("text"):
        return True
    delta = choice.get("delta")
    return isinstance(delta, dict) and bool(delta.get("content") or delta.get("reasoning_content"))


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)
