"""The few raw-ASGI pieces the gateway's hot path needs, without a framework's per-request objects."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

from fleetserve.protocol.errors import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, payload: object) -> None:
    await send_bytes(send, status, orjson.dumps(payload))


async def send_error(send: Send, error: APIError) -> None:
    headers = [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send_bytes(send, error.status, error.json_bytes(), headers=headers)


def header_map(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name (ASGI servers already lower-case them); last one wins."""
    return dict(scope["headers"])
