"""Server-sent events as OpenAI streams use them: `data: <json>\n\n`, ending with `data: [DONE]\n\n`."""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson

DONE = b"data: [DONE]\n\n"
_EVENT_END = re.compile(rb"\r?\n\r?\n")


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
        buffer = self._buffer + chunk if self._buffer else chunk
        start = 0
        # Scan with an offset and cut the buffer once per feed, so a read holding many events stays linear.
        while (end := _EVENT_END.search(buffer, start)) is not None:
            event = buffer[start : end.start()]
            start = end.end()
            data = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
            if data:
                yield b"\n".join(data)
        self._buffer = buffer[start:]
