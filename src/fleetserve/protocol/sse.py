"""Server-sent events as OpenAI streams use them: `data: <json>\n\n`, ending with `data: [DONE]\n\n`."""

from __future__ import annotations

from collections.abc import Iterator

import orjson

DONE = b"data: [DONE]\n\n"


def sse_event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def sse_error(status: int, message: str, error_type: str = "APIError") -> bytes:
    """The event a stream ends with when it fails after its first byte."""
    return sse_event({"error": {"message": message, "type": error_type, "param": None, "code": status}})


class SSEDecoder:
    """Splits a byte stream into SSE `data:` payloads, whatever the chunk boundaries are."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buffer += chunk
        while True:
            end = self._find_event_end()
            if end is None:
                return
            event, self._buffer = self._buffer[: end[0]], self._buffer[end[1] :]
            data = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data)

    def _find_event_end(self) -> tuple[int, int] | None:
        for separator in (b"\n\n", b"\r\n\r\n"):
            index = self._buffer.find(separator)
            if index >= 0:
                return index, index + len(separator)
        return None
