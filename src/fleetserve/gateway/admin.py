"""The admin API, on its own port and off unless `gateway.admin_port` is set: list, add and remove
engines while the gateway runs. It is not for clients, so it lives apart from the OpenAI endpoints, on its
own address (`gateway.admin_host`, loopback by default), and with a token it asks for every request as
`Authorization: Bearer TOKEN`, compared in constant time. An engine registered here is someone else's
URL: the gateway does not forward clients' Authorization headers to it unless `forward_auth` is true."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetserve.config import EngineDescription
from fleetserve.fleet.state import EngineState
from fleetserve.gateway.app import Gateway
from fleetserve.protocol.errors import error_body

log = logging.getLogger(__name__)


def describe(engine: EngineState) -> dict[str, Any]:
    metrics = engine.metrics
    spec = engine.spec
    return {
        "id": engine.engine_id,
        "url": engine.url,
        "model": engine.model,
        "gpu": spec.gpu,
        "tp": spec.tp,
        "dialect": spec.dialect,
        "forward_auth": spec.forward_auth,
        "group": spec.group,
        "adapters": sorted(engine.adapters),
        "draining": engine.draining,
        "state": engine.health.state.value,
        "in_flight": engine.in_flight,
        "capacity": engine.capacity,
        "running": metrics.running if metrics else None,
        "waiting": metrics.waiting if metrics else None,
        "kv_usage": metrics.kv_usage if metrics else None,
    }


def admin_app(gateway: Gateway, token: str | None = None) -> Starlette:
    """The admin API of `gateway`; with `token`, every request must carry it as a bearer token."""
    expected = None if token is None else f"Bearer {token}".encode("latin-1")

    async def list_engines(request: Request) -> Response:
        return JSONResponse({"engines": [describe(engine) for engine in gateway.registry.engines()]})

    async def add_engine(request: Request) -> Response:
        try:
            spec = EngineDescription.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse(error_body(400, _first_error(exc)), status_code=400)
        if spec.id in gateway.registry:
            return JSONResponse(error_body(409, f"engine {spec.id!r} already exists"), status_code=409)
        return JSONResponse(describe(gateway.add_engine(spec)), status_code=201)

    async def remove_engine(request: Request) -> Response:
        engine_id = request.path_params["engine_id"]
        if engine_id not in gateway.registry:
            return JSONResponse(error_body(404, f"no engine {engine_id!r}"), status_code=404)
        return JSONResponse(describe(gateway.remove_engine(engine_id)))

    return Starlette(
        routes=[
            Route("/engines", list_engines, methods=["GET"]),
            Route("/engines", add_engine, methods=["POST"]),
            Route("/engines/{engine_id}", remove_engine, methods=["DELETE"]),
        ],
        middleware=[Middleware(_TokenCheck, expected=expected)],
        exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal_error},
    )


class _TokenCheck:
    """Refuses every request without the expected `Authorization` header, before any route runs."""

    def __init__(self, app: ASGIApp, expected: bytes | None) -> None:
        self.app = app
        self.expected = expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is not None and scope["type"] == "http":
            sent = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(sent, self.expected):
                response = JSONResponse(
                    error_body(401, "the admin API needs `Authorization: Bearer <admin token>`"),
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse(error_body(404, f"no route {request.url.path}"), status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        error_body(405, f"{request.method} is not allowed on {request.url.path}"), status_code=405
    )


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("admin API: %s %s failed", request.method, request.url.path, exc_info=exc)
    return JSONResponse(
        error_body(500, "internal error in the admin API; see the gateway's log"), status_code=500
    )


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"
