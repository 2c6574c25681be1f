"""What a connection may do before it has sent a whole request: bounded in time, in header bytes, and in
how many such connections one client address (and everyone together) may hold.

uvicorn's httptools protocol has no header-read timeout, no header size limit, and no bound on
connections that never finish a request, so a client that opens many connections and sends a few bytes on
each holds them for as long as it likes. `guarded_protocol` returns a subclass that adds those, answering
every refusal with an OpenAI-shaped JSON error and `connection: close`:

- more than `max_pending_connections` connections (or `max_pending_per_client` from one address) that have
  not yet sent a whole request: 503 with Retry-After, at once;
- headers not complete `header_timeout_s` after the connection opened (or after a keep-alive request's
  first byte): 408;
- request line and headers over `max_header_bytes`: 431.

The request body has its own deadline in the gateway (`read_body`), which answers 408; as a backstop a
connection whose request is still incomplete `2 * body_timeout_s` after its headers is closed. Idle
keep-alive connections are closed by uvicorn after `timeout_keep_alive` (the gateway's `idle_timeout_s`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass, field
from http import HTTPStatus

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleetserve.config import GatewayConfig
from fleetserve.protocol.errors import APIError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_pending_connections: int = 1024
    max_pending_per_client: int = 64

    @classmethod
    def of(cls, config: GatewayConfig) -> ConnectionLimits:
        return cls(
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            max_header_bytes=config.max_header_bytes,
            max_pending_connections=config.max_pending_connections,
            max_pending_per_client=config.max_pending_per_client,
        )


@dataclass
class PendingConnections:
    """Connections of one server that have not yet sent a whole request, in all and per client address."""

    limits: ConnectionLimits
    total: int = 0
    by_client: Counter[str] = field(default_factory=Counter)

    def enter(self, client: str) -> str | None:
        """Count one more; or the reason it may not be, leaving the counts as they were."""
        if self.total >= self.limits.max_pending_connections:
            return f"the gateway holds {self.total} connections that have not sent a whole request"
        if self.by_client[client] >= self.limits.max_pending_per_client:
            return f"{client} holds {self.by_client[client]} connections that have not sent a whole request"
        self.total += 1
        self.by_client[client] += 1
        return None

    def leave(self, client: str) -> None:
        self.total -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]


def raw_error_response(error: APIError) -> bytes:
    """A whole HTTP/1.1 response carrying `error`, for answers written before any ASGI cycle exists."""
    body = error.json_bytes()
    lines = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in error.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass enforcing `limits`, with its own count of pending connections (one
    per server: pass the class as uvicorn's `http`)."""
    pending = PendingConnections(limits)

    class GuardedHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._client_key = self.client[0] if self.client else ""
            self._pending = False
            self._headers_done = True
            self._header_bytes = 0
            self._deadline: asyncio.TimerHandle | None = None
            self._begin_request()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_deadline()
            self._leave_pending()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._pending and not self.transport.is_closing():
                self._begin_request()  # the first byte of a keep-alive connection's next request
            if not self._pending:
                return  # refused: the answer is written and the connection closing
            if not self._headers_done:
                self._header_bytes += len(data)
            super().data_received(data)
            if not self._headers_done and self._header_bytes > limits.max_header_bytes:
                self._refuse(
                    APIError(
                        431, f"request headers are larger than the limit of {limits.max_header_bytes} bytes"
                    )
                )

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._headers_done = False

        def on_headers_complete(self) -> None:
            self._headers_done = True
            self._header_bytes = 0
            self._arm(2 * limits.body_timeout_s, self._body_overdue)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._cancel_deadline()
            self._leave_pending()
            super().on_message_complete()

        def _begin_request(self) -> None:
            refusal = pending.enter(self._client_key)
            if refusal is not None:
                log.warning("refused a connection from %s: %s", self._client_key, refusal)
                self._write_and_close(
                    APIError(503, f"{refusal}; retry shortly", headers={"Retry-After": "1"})
                )
                return
            self._pending = True
            self._headers_done = False
            self._header_bytes = 0
            self._arm(limits.header_timeout_s, self._headers_overdue)

        def _headers_overdue(self) -> None:
            if self._headers_done:
                return
            self._refuse(
                APIError(408, f"request headers did not arrive within {limits.header_timeout_s:g} s")
            )

        def _body_overdue(self) -> None:
            # the gateway answers 408 itself after body_timeout_s; this only catches what nothing read
            if self._pending and not self.transport.is_closing():
                self.transport.close()

        def _refuse(self, error: APIError) -> None:
            """Answer a request whose headers are not complete (so no ASGI cycle has started) and close."""
            self._cancel_deadline()
            self._leave_pending()
            self._write_and_close(error)

        def _write_and_close(self, error: APIError) -> None:
            if not self.transport.is_closing():
                self.transport.write(raw_error_response(error))
                self.transport.close()

        def _arm(self, delay: float, callback: object) -> None:
            self._cancel_deadline()
            self._deadline = self.loop.call_later(delay, callback)  # type: ignore[arg-type]

        def _cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _leave_pending(self) -> None:
            if self._pending:
                self._pending = False
                pending.leave(self._client_key)

    GuardedHttpToolsProtocol.pending = pending  # type: ignore[attr-defined]
    return GuardedHttpToolsProtocol
