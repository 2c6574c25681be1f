"""The emulated engine's HTTP application: the OpenAI endpoints, health and metrics here, vLLM's and
SGLang's other endpoints from `compat.py`. Every error leaves through one set of exception handlers, as
OpenAI-shaped JSON (a bug too: its 500 never is a bare text page)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetserve.engines.emulator.compat import compat_routes
from fleetserve.engines.emulator.generation import checked_token_ids, generate
from fleetserve.engines.emulator.http import json_response, render_chat
from fleetserve.engines.emulator.metrics import CONTENT_TYPE
from fleetserve.engines.emulator.migration import migration_headers, migration_routes
from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError, error_body

if TYPE_CHECKING:
    from fleetserve.engines.emulator.engine import EmulatedEngine

log = logging.getLogger(__name__)


def build_app(engine: EmulatedEngine) -> Starlette:
    async def health(request: Request) -> Response:
        if engine.driver.failure is not None:
            return json_response(error_body(500, str(engine.driver.failure)), status=500)
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE)

    async def models(request: Request) -> Response:
        spec = engine.model_spec
        base = openai.model_card(
            engine.served_model_name,
            spec.hf_id or spec.name,
            engine.created,
            max_model_len=engine.max_model_len,
        )
        adapters = [
            openai.model_card(name, path, engine.created, parent=engine.served_model_name)
            for name, path in engine.adapters.items()
        ]
        return json_response(openai.model_list([base, *adapters]))

    async def completions(request: Request) -> Response:
        completion = openai.parse_completion_request(await request.body())
        prompt = completion.prompt
        if isinstance(prompt, str):
            token_ids = engine.tokenizer.encode(prompt)
        else:
            token_ids = checked_token_ids(engine, prompt)  # type: ignore[arg-type]
        return generate(engine, completion, token_ids, "completion", **migration_headers(request))

    async def chat_completions(request: Request) -> Response:
        chat = openai.parse_chat_request(await request.body())
        token_ids = engine.tokenizer.encode(render_chat(chat))
        return generate(engine, chat, token_ids, "chat", **migration_headers(request))

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ping", health, methods=["GET", "POST"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            *compat_routes(engine),
            *migration_routes(engine),
        ],
        exception_handlers={
            APIError: _api_error,
            404: _not_found,
            405: _method_not_allowed,
            Exception: _internal_error,
        },
    )


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return json_response(exc.body(), status=exc.status)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("emulated engine: %s %s failed", request.method, request.url.path, exc_info=exc)
    return json_response(error_body(500, f"internal error: {exc!r}"), status=500)


async def _not_found(request: Request, exc: Exception) -> Response:
    return json_response(error_body(404, f"{request.url.path} not found", error_type="NotFoundError"), 404)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return json_response(
        error_body(405, f"Method {request.method} not allowed", error_type="MethodNotAllowed"), status=405
    )
