"""A small OpenAI-shaped engine for gateway tests, run as its own process, with fault knobs.

    python upstream_server.py --port P --model m [--adapter a] [--chunk-delay-ms D] [--chunks N]

Its behaviour can be changed at run time with `POST /control {"mode": ...}`:
    ok                      answer normally
    hang                    never answer completions or /health (as a wedged process would)
    die_on_request          exit the process as soon as a completion request arrives
    die_mid_stream          stream `die_after` chunks plus half of the next event, then exit
    stall_mid_stream        stream `die_after` chunks, then send nothing more (the process lives)
    error                   answer completions with HTTP 500
and `{"linger_after_done_s": S}` holds a stream open S seconds after its `data: [DONE]`.
`GET /control` returns the state, with the Authorization header of the last completion request and the
`user` field of every completion request in the order they arrived (`seen`), and the last completion
request's body (`last_body`).
Every completion answer carries the server's name, so a test can tell which engine served it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import orjson
from aiohttp import web


def build_app(args: argparse.Namespace) -> web.Application:
    seen: list[object] = []
    state: dict[str, object] = {
        "mode": "ok",
        "die_after": 2,
        "linger_after_done_s": 0,
        "authorization": None,
        "last_body": None,
        "seen": seen,
    }
    counters = {"running": 0, "served": 0}
    forever = asyncio.Event()

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            state.update(await request.json())
        return web.json_response(state)

    async def health(request: web.Request) -> web.Response:
        if state["mode"] == "hang":
            await forever.wait()
        return web.Response(text="")

    async def models(request: web.Request) -> web.Response:
        data = [{"id": args.model, "object": "model", "created": 0, "owned_by": "test", "parent": None}]
        data += [
            {"id": name, "object": "model", "created": 0, "owned_by": "test", "parent": args.model}
            for name in args.adapter
        ]
        return web.json_response({"object": "list", "data": data})

    async def metrics(request: web.Request) -> web.Response:
        text = (
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{args.model}"}} {counters["running"]}\n'
            f'vllm:num_requests_waiting{{model_name="{args.model}"}} 0\n'
            f'vllm:kv_cache_usage_perc{{model_name="{args.model}"}} {min(counters["running"] / 10, 1.0)}\n'
            f"upstream_served_total {counters['served']}\n"
        )
        return web.Response(text=text)

    async def completion(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        state["authorization"] = request.headers.get("Authorization")
        state["last_body"] = body
        seen.append(body.get("user"))
        mode = state["mode"]
        if mode == "hang":
            await forever.wait()
        if mode == "die_on_request":
            os._exit(3)
        if mode == "error":
            return web.json_response({"error": {"message": "injected failure", "code": 500}}, status=500)
        counters["running"] += 1
        try:
            chat = request.path.endswith("/chat/completions")
            chunks = int(body.get("max_tokens") or args.chunks)
            if body.get("stream"):
                return await stream(request, body, chat, chunks)
            await asyncio.sleep(args.chunk_delay_ms * chunks / 1000)
            text = " ".join(f"t{i}" for i in range(chunks))
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                if chat
                else {"index": 0, "text": text, "finish_reason": "length"}
            )
            return web.json_response(
                {
                    "id": f"{args.name}-{counters['served']}",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "system_fingerprint": args.name,
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": chunks, "total_tokens": chunks + 1},
                }
            )
        finally:
            counters["running"] -= 1
            counters["served"] += 1

    async def stream(request: web.Request, body: dict, chat: bool, chunks: int) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for index in range(chunks):
            await asyncio.sleep(args.chunk_delay_ms / 1000)
            delta = {"content": f"t{index} "} if chat else None
            choice = {"index": 0, "delta": delta} if chat else {"index": 0, "text": f"t{index} "}
            event = b"data: " + orjson.dumps(
                {
                    "id": f"{args.name}-stream",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "system_fingerprint": args.name,
                    "choices": [{**choice, "finish_reason": "length" if index == chunks - 1 else None}],
                }
            )
            event += b"\n\n"
            if state["mode"] == "die_mid_stream" and index == state["die_after"]:
                await response.write(event[: len(event) // 2])
                await asyncio.sleep(0.05)  # let the half event leave the socket
                os._exit(4)
            if state["mode"] == "stall_mid_stream" and index == state["die_after"]:
                await forever.wait()
            await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(float(state["linger_after_done_s"]))  # type: ignore[arg-type]
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/control", control)
    app.router.add_get("/control", control)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", completion)
    app.router.add_post("/v1/completions", completion)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="test-model")
    parser.add_argument("--name", default="upstream")
    parser.add_argument("--adapter", action="append", default=[])
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--chunk-delay-ms", type=float, default=5.0)
    args = parser.parse_args()
    web.run_app(build_app(args), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
