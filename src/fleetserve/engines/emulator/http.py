"""Small helpers the emulator's endpoints share: JSON in and out, and the prompt a chat renders to."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError
from fleetserve.protocol.tokenizer import chat_prompt


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; anything else is vLLM's 400."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise APIError(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return data


def render_chat(chat: openai.ChatCompletionRequest) -> str:
    return chat_prompt([(message.role, message.text()) for message in chat.messages])
