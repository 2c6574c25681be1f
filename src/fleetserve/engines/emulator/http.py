"""Small helpers the emulator's endpoints share: JSON out, and the prompt a chat renders to (JSON in is
`protocol.openai.json_object`)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from fleetserve.protocol import openai
from fleetserve.protocol.tokenizer import chat_prompt


def json_response(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def render_chat(chat: openai.ChatCompletionRequest) -> str:
    return chat_prompt(
        [(message.role, message.text()) for message in chat.messages],
        add_generation_prompt=chat.add_generation_prompt,
        continue_final=chat.continue_final_message,
    )
