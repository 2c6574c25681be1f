"""Builders of the views routing tests hand to policies: engines of model "m", fleets, requests."""

from __future__ import annotations

from fleetserve.routing import EngineView, FleetView, RequestInfo
from fleetserve.routing.base import PrefixLookup


def fleet(*engines: EngineView, prefix_index: PrefixLookup | None = None) -> FleetView:
    return FleetView({engine.engine_id: engine for engine in engines}, prefix_index)


def engine(engine_id: str, **fields: object) -> EngineView:
    return EngineView(engine_id=engine_id, model="m", **fields)  # type: ignore[arg-type]


def request(request_id: str, tokens: list[int], **fields: object) -> RequestInfo:
    return RequestInfo(
        request_id=request_id, model="m", prompt_len=len(tokens), prompt_token_ids=tokens, **fields
    )  # type: ignore[arg-type]
