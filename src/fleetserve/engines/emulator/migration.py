"""The emulated engine's side of migration, for a router that moves running requests between engines
(`fleetserve.migration` decides, the gateway carries the client's stream):

    GET  /fleetserve/load     the engine's load as the migration controller reads it (`EngineLoad.to_wire`)
    POST /fleetserve/export   {"request_id": ...}: take a decoding request off this engine; its stream sends
                              what it made here and ends without [DONE]; the answer says how it goes on
                              (output_left, finish_reason: what x-fleetserve-import carries)
    x-fleetserve-import       on a completion: continue a request another engine exported (`Imported`)
    x-request-id              on a completion: the request's id in the engine (vLLM honours it too)

The KV transfer itself is the gateway's to pace (the engine model's staged copy); here an imported
request's context is admitted as already computed, or prefilled again when `kv` is false.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetserve.engines.emulator.generation import Imported
from fleetserve.engines.emulator.http import json_response
from fleetserve.migration import engine_load
from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError

if TYPE_CHECKING:
    from fleetserve.engines.emulator.engine import EmulatedEngine

MAX_REQUEST_ID_CHARS = 256


def migration_headers(request: Request) -> dict[str, Any]:
    """`generate`'s request_id and imported arguments from a completion's headers."""
    request_id = request.headers.get("x-request-id")
    if request_id is not None and not 0 < len(request_id) <= MAX_REQUEST_ID_CHARS:
        raise APIError(
            400, f"x-request-id must have 1 to {MAX_REQUEST_ID_CHARS} characters", param="x-request-id"
        )
    imported = request.headers.get("x-fleetserve-import")
    return {
        "request_id": request_id,
        "imported": None if imported is None else Imported.from_header(imported),
    }


def migration_routes(engine: EmulatedEngine) -> list[Route]:
    async def load(request: Request) -> Response:
        snapshot = engine.driver.apply(
            lambda now: engine_load(engine.engine_id, engine.served_model_name, engine.engine)
        )
        return json_response(snapshot.to_wire())

    async def export(request: Request) -> Response:
        fields = openai.json_object(await request.body())
        request_id = fields.get("request_id")
        if not isinstance(request_id, str):
            raise APIError(400, "request_id must be a string", param="request_id")
        generation = engine.generations.get(request_id)
        if generation is None:
            raise APIError(404, f"no request {request_id!r} on this engine", error_type="NotFoundError")
        exported = generation.export()
        if exported is None:
            raise APIError(409, f"request {request_id!r} is not decoding", error_type="ConflictError")
        return json_response(
            {
                "request_id": request_id,
                "prompt_tokens": exported.prompt_len,
                "output_tokens": exported.output_done,
                "output_left": exported.output_left,
                "finish_reason": generation.plan.finish_reason,
            }
        )

    return [
        Route("/fleetserve/load", load, methods=["GET"]),
        Route("/fleetserve/export", export, methods=["POST"]),
    ]
