"""What a request must pass before it is routed: a place in the bounded queue, a body of bounded size,
and JSON that names a model and has the fields the endpoint needs. Every refusal is OpenAI-shaped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from fleetserve.errors import FleetserveError
from fleetserve.gateway.asgi import Receive
from fleetserve.protocol.errors import APIError

Endpoint = Literal["chat", "completions"]

# rough characters per token, to size a prompt without a tokenizer on the hot path
CHARS_PER_TOKEN = 4


class AdmissionGate:
    """Counts requests inside the gateway (bodies read, not yet answered); beyond `max_queue` new ones get
    429 with Retry-After."""

    def __init__(self, max_queue: int, retry_after_s: int = 1) -> None:
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.inside = 0

    def enter(self) -> None:
        if self.inside >= self.max_queue:
            raise APIError(
                429,
                f"the gateway is at its limit of {self.max_queue} requests in flight; retry shortly",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.inside += 1

    def leave(self) -> None:
        self.inside -= 1


async def read_body(receive: Receive, declared_length: bytes | None, max_bytes: int) -> bytes:
    if declared_length is not None and declared_length.isdigit() and int(declared_length) > max_bytes:
        raise _too_large(max_bytes)
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


class ClientGone(FleetserveError):
    """The client disconnected before its request was read."""


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"request body is larger than the gateway's limit of {max_bytes} bytes")


@dataclass(slots=True)
class ParsedRequest:
    payload: dict[str, Any]
    model: str
    stream: bool
    prompt_len: int
    max_output_tokens: int


def parse_request(body: bytes, endpoint: Endpoint) -> ParsedRequest:
    """Parse the body once and check the fields routing relies on; the engine validates the rest."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "`model` is required and must be a non-empty string", param="model")
    stream = payload.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise APIError(400, "`stream` must be a boolean", param="stream")
    max_output = _max_output_tokens(payload)
    prompt_len = _chat_prompt_len(payload) if endpoint == "chat" else _completion_prompt_len(payload)
    return ParsedRequest(payload, model, bool(stream), prompt_len, max_output)


def _max_output_tokens(payload: dict[str, Any]) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        value = payload.get(field)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise APIError(400, f"`{field}` must be a positive integer", param=field)
        return value
    return 0


def _chat_prompt_len(payload: dict[str, Any]) -> int:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list", param="messages")
    chars = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise APIError(400, "each message must be an object with a `role`", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            # a part's text may be anything a client sends (null, a number): only strings have a length
            chars += sum(
                len(text)
                for part in content
                if isinstance(part, dict) and isinstance(text := part.get("text"), str)
            )
    return chars // CHARS_PER_TOKEN + 1


def _completion_prompt_len(payload: dict[str, Any]) -> int:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return len(prompt) // CHARS_PER_TOKEN + 1
    if isinstance(prompt, list) and prompt:
        if all(isinstance(token, int) for token in prompt):
            return len(prompt)
        if all(isinstance(item, str) for item in prompt):
            return sum(len(item) for item in prompt) // CHARS_PER_TOKEN + 1
        if all(isinstance(item, list) for item in prompt):
            return sum(len(item) for item in prompt)
    raise APIError(400, "`prompt` must be a string, a list of strings or a list of token ids", param="prompt")
