"""Just enough of an OpenAI streaming server to benchmark against, with knobs to inject failures.

    python fake_openai_server.py --port 8123 --fail-every 5 --fail-status 503

Request n (counting from 1, over both endpoints) fails with `--fail-status` when n % fail_every == 0,
sends an error event mid-stream when n % stream_error_every == 0, and stops without `[DONE]` when
n % truncate_every == 0. Every reply streams `max_tokens` one-word chunks, `--chunk-delay-ms` apart.
`GET /stats` tells how many generation requests arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fleetserve.protocol.sse import DONE, sse_error, sse_event


@dataclass(frozen=True)
class Knobs:
    fail_every: int = 0
    fail_status: int = 503
    stream_error_every: int = 0
    truncate_every: int = 0
    chunk_delay_ms: float = 0.0


def _every(n: int, period: int) -> bool:
    return period > 0 and n % period == 0


def build_app(knobs: Knobs) -> Starlette:
    counter = itertools.count(1)
    received = 0

    async def generate(request: Request) -> Response:
        nonlocal received
        n = next(counter)
        received = n
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        if _every(n, knobs.fail_every):
            message = {"error": {"message": f"injected failure {n}", "type": "ServiceUnavailable"}}
            return JSONResponse(message, status_code=knobs.fail_status)
        max_tokens = int(body.get("max_tokens") or 16)
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        usage = {
            "prompt_tokens": len(str(prompt).split()),
            "completion_tokens": max_tokens,
            "total_tokens": len(str(prompt).split()) + max_tokens,
        }
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not body.get("stream"):
            text = " tok" * max_tokens
            choice = {"index": 0, "finish_reason": "length", "logprobs": None}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            kind = "chat.completion" if chat else "text_completion"
            return JSONResponse(_envelope(n, body, kind, [choice]) | {"usage": usage})
        return StreamingResponse(
            _stream(n, body, chat, max_tokens, include_usage, usage, knobs), media_type="text/event-stream"
        )

    async def stats(_: Request) -> Response:
        return JSONResponse({"requests": received})

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def models(_: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": "test"}]}
        )

    return Starlette(
        routes=[
            Route("/v1/completions", generate, methods=["POST"]),
            Route("/v1/chat/completions", generate, methods=["POST"]),
            Route("/v1/models", models),
            Route("/health", health),
            Route("/stats", stats),
        ]
    )


def _envelope(n: int, body: dict, kind: str, choices: list[dict]) -> dict:
    return {
        "id": f"req-{n}",
        "object": kind,
        "created": int(time.time()),
        "model": body["model"],
        "choices": choices,
    }


async def _stream(
    n: int, body: dict, chat: bool, max_tokens: int, include_usage: bool, usage: dict, knobs: Knobs
) -> AsyncIterator[bytes]:
    kind = "chat.completion.chunk" if chat else "text_completion"
    if chat:
        yield sse_event(
            _envelope(n, body, kind, [{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        )
    for position in range(max_tokens):
        if knobs.chunk_delay_ms:
            await asyncio.sleep(knobs.chunk_delay_ms / 1000.0)
        if position == max_tokens // 2:
            if _every(n, knobs.stream_error_every):
                yield sse_error(500, f"injected stream error {n}")
                return
            if _every(n, knobs.truncate_every):
                return
        finish = "length" if position == max_tokens - 1 else None
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice |= {"delta": {"content": " tok"}} if chat else {"text": " tok"}
        yield sse_event(_envelope(n, body, kind, [choice]))
    if include_usage:
        yield sse_event(_envelope(n, body, kind, []) | {"usage": usage})
    yield DONE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fail-every", type=int, default=0)
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--stream-error-every", type=int, default=0)
    parser.add_argument("--truncate-every", type=int, default=0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    knobs = Knobs(
        args.fail_every, args.fail_status, args.stream_error_every, args.truncate_every, args.chunk_delay_ms
    )
    uvicorn.run(build_app(knobs), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
