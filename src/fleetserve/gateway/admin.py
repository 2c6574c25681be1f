"""The admin API, on its own port and off unless `gateway.admin_port` is set: list, add and remove
engines while the gateway runs. It is not for clients, so it lives apart from the OpenAI endpoints, on its
own address (`gateway.admin_host`, loopback by default), and with a token it asks for every request as
`Authorization: Bearer TOKEN`, compared in constant time. An engine registered here is someone else's
URL: the gateway does not forward clients' Authorization headers to it unless `forward_auth` is true."""

from __future__ import annotations

import datetime
import hmac
import logging
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetserve.config import EngineDescription
from fleetserve.control import CannotStart, UnknownGroup
from fleetserve.control.members import Member
from fleetserve.fleet.state import EngineState
from fleetserve.gateway.app import Gateway
from fleetserve.protocol.errors import error_body

log = logging.getLogger(__name__)


def describe(engine: EngineState, member: Member | None = None) -> dict[str, Any]:
    """An engine as the admin API shows it: `state` is its lifecycle (starting, ready, draining) since
    `since`, `health` what the gateway's probes and requests make of it."""
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
        **_lifecycle(member, "draining" if engine.draining else "ready"),
        "health": engine.health.state.value,
        "in_flight": engine.in_flight,
        "capacity": engine.capacity,
        "running": metrics.running if metrics else None,
        "waiting": metrics.waiting if metrics else None,
        "kv_usage": metrics.kv_usage if metrics else None,
    }


def _lifecycle(member: Member | None, otherwise: str) -> dict[str, Any]:
    """`state` and `since` (ISO 8601, UTC) from the fleet's record of the engine."""
    if member is None:
        return {"state": otherwise, "since": None}
    since = time.time() - (time.monotonic() - member.since)  # the actuator's clock is monotonic
    return {
        "state": member.state.value,
        "since": datetime.datetime.fromtimestamp(since, datetime.UTC).isoformat(timespec="seconds"),
    }


def _starting(member: Member) -> dict[str, Any]:
    """An engine whose process is starting: not registered with the gateway yet."""
    return {"id": member.engine_id, "group": member.group, **_lifecycle(member, "starting"), "health": None}


def list_engines(gateway: Gateway) -> list[dict[str, Any]]:
    members = gateway.members
    listed = [describe(engine, members.get(engine.engine_id)) for engine in gateway.registry.engines()]
    starting = [_starting(member) for member in members.all() if member.engine_id not in gateway.registry]
    return listed + starting


def admin_app(gateway: Gateway, token: str | None = None) -> Starlette:
    """The admin API of `gateway`; with `token`, every request must carry it as a bearer token."""
    expected = None if token is None else f"Bearer {token}".encode("latin-1")

    async def engines(request: Request) -> Response:
        return JSONResponse({"engines": list_engines(gateway)})

    async def autoscale(request: Request) -> Response:
        """Each autoscaled group's policy and metric, and the recent scale events."""
        if gateway.autoscaling is None:
            return JSONResponse({"autoscale": {}, "scale_events": []})
        return JSONResponse(gateway.autoscaling.report())

    async def add_engine(request: Request) -> Response:
        """A body with a `url` registers that engine; `{"group": NAME}` asks fleetserve to start one."""
        body = await request.body()
        try:
            start = StartEngine.model_validate_json(body)
        except ValidationError:
            start = None
        if start is not None:
            return _start(gateway, start.group)
        try:
            spec = EngineDescription.model_validate_json(body)
        except ValidationError as exc:
            return JSONResponse(error_body(400, _first_error(exc)), status_code=400)
        if spec.id in gateway.registry:
            return JSONResponse(error_body(409, f"engine {spec.id!r} already exists"), status_code=409)
        return JSONResponse(describe(gateway.add_engine(spec), gateway.members.get(spec.id)), status_code=201)

    async def remove_engine(request: Request) -> Response:
        """Unregister the engine; one fleetserve started is also stopped (its process ends)."""
        engine_id = request.path_params["engine_id"]
        engine = gateway.registry.get(engine_id)
        if engine is None:
            return JSONResponse(error_body(404, f"no engine {engine_id!r}"), status_code=404)
        actuator = gateway.actuator
        if actuator is not None and actuator.manages(engine_id):
            actuator.stop(engine_id, time.monotonic())
            return JSONResponse({**describe(engine), "state": "stopping"})
        return JSONResponse(describe(gateway.remove_engine(engine_id)))

    async def drain_engine(request: Request) -> Response:
        """Send the engine no new requests; stop it once those on it finish (or after timeout_s)."""
        engine_id = request.path_params["engine_id"]
        if engine_id not in gateway.registry:
            return JSONResponse(error_body(404, f"no engine {engine_id!r}"), status_code=404)
        try:
            drain = Drain.model_validate_json(await request.body() or b"{}")
        except ValidationError as exc:
            return JSONResponse(error_body(400, _first_error(exc)), status_code=400)
        if gateway.actuator is None:
            return _cannot_start()
        gateway.actuator.drain(engine_id, time.monotonic(), drain.timeout_s)
        engine = gateway.registry.get(engine_id)  # a drain of an idle engine may have stopped it already
        body = _gone(engine_id) if engine is None else describe(engine, gateway.members.get(engine_id))
        return JSONResponse(body, status_code=202)

    return Starlette(
        routes=[
            Route("/engines", engines, methods=["GET"]),
            Route("/autoscale", autoscale, methods=["GET"]),
            Route("/engines", add_engine, methods=["POST"]),
            Route("/engines/{engine_id}", remove_engine, methods=["DELETE"]),
            Route("/engines/{engine_id}/drain", drain_engine, methods=["POST"]),
        ],
        middleware=[Middleware(_TokenCheck, expected=expected)],
        exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal_error},
    )


class StartEngine(BaseModel):
    """`POST /engines` body that asks fleetserve to start one more engine of a fleet-file group."""

    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1, description="An engine group of the fleet file.")


class Drain(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float | None = Field(
        None,
        ge=0,
        description="Stop the engine after this long even if requests remain (default: the"
        " fleet file's gateway.drain_timeout_s).",
    )


def _start(gateway: Gateway, group: str) -> Response:
    if gateway.actuator is None:
        return _cannot_start()
    try:
        engine_id = gateway.actuator.start(group, time.monotonic())
    except UnknownGroup as exc:
        return JSONResponse(error_body(404, str(exc)), status_code=404)
    except CannotStart as exc:
        return JSONResponse(error_body(503, str(exc)), status_code=503)
    return JSONResponse({"id": engine_id, "group": group, "state": "starting"}, status_code=202)


def _cannot_start() -> Response:
    message = (
        "this gateway does not start or drain engines (it was started with --no-launch, or without serve)"
    )
    return JSONResponse(error_body(409, message), status_code=409)


def _gone(engine_id: str) -> dict[str, Any]:
    return {"id": engine_id, "state": "gone"}


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
