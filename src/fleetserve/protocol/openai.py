"""OpenAI completions and chat-completions bodies as vLLM accepts and answers them.

`parse_completion_request` / `parse_chat_request` turn raw body bytes into typed requests or raise an
`APIError(400)` that says which field is wrong. Unknown fields are ignored, as vLLM ignores them. The
builders return plain dicts in vLLM's response layout (ready for orjson), so the emulator answers
exactly like vLLM and the gateway can build the same shapes (e.g. for cached answers).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fleetserve.errors import InputError
from fleetserve.protocol.errors import APIError

MAX_STOP_SEQUENCES = 64  # bounded like everything else; vLLM itself has no limit
MAX_TOOLS = 128
DEFAULT_COMPLETION_MAX_TOKENS = 16  # vLLM's (and OpenAI's) default for /v1/completions
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # vLLM's range: a torch.long

# ---------------------------------------------------------------------------------------------------
# requests


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _GenerationRequest(_Lenient):
    """Fields shared by completions and chat completions; vLLM's extra sampling fields included."""

    model: str | None = None
    max_tokens: int | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = 0
    response_format: dict[str, Any] | None = None

    @field_validator("stream", "n", mode="before")
    @classmethod
    def _null_is_absent(cls, value: Any, info: ValidationInfo) -> Any:
        """vLLM (and OpenAI) read `"stream": null` and `"n": null` as the field left out."""
        if value is None:
            return cls.model_fields[info.field_name].default
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def _check_common(self, output_limit: int | None, limit_field: str) -> None:
        if output_limit is not None and output_limit < 1:
            raise _FieldError(limit_field, f"{limit_field} must be at least 1, got {output_limit}.")
        if output_limit is not None and self.min_tokens > output_limit:
            raise _FieldError(
                "min_tokens",
                f"min_tokens must be less than or equal to {limit_field}={output_limit}, "
                f"got {self.min_tokens}.",
            )
        if self.n != 1:
            raise _FieldError("n", f"n must be 1: this engine returns one choice per request, got {self.n}.")
        if len(self.stop_sequences) > MAX_STOP_SEQUENCES:
            raise _FieldError("stop", f"at most {MAX_STOP_SEQUENCES} stop sequences are accepted.")
        if self.stream_options is not None and not self.stream:
            raise _FieldError("stream_options", "Stream options can only be defined when `stream=True`.")


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. One prompt per request: a string or a list of token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = DEFAULT_COMPLETION_MAX_TOKENS  # absent: 16; null: the room left in the context
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("echo", mode="before")
    @classmethod
    def _null_echo_is_absent(cls, value: Any) -> Any:
        return False if value is None else value

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        self._check_common(self.max_tokens, "max_tokens")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str | list):
            if len(self.prompt) != 1:
                raise _FieldError("prompt", "only one prompt per request is supported; send one each.")
            self.prompt = self.prompt[0]  # type: ignore[assignment]
        if isinstance(self.prompt, list) and not self.prompt:
            raise _FieldError("prompt", "prompt must not be empty.")
        if self.logprobs is not None:
            raise _FieldError("logprobs", "logprobs are not supported by this engine; omit the field.")
        if self.echo:
            raise _FieldError("echo", "echo is not supported by this engine.")
        if self.best_of not in (None, 1):
            raise _FieldError("best_of", "best_of must be 1.")
        if self.suffix is not None:
            raise _FieldError("suffix", "suffix is not currently supported")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens


class ChatMessage(_Lenient):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(_text_part(part) for part in self.content)


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # vLLM's: render the conversation without a new assistant turn, so the model goes on with the last
    # (assistant) message; how a stream is resumed on another engine
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        limit_field = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        self._check_common(self.output_limit, limit_field)
        if self.continue_final_message and self.add_generation_prompt:
            raise _FieldError(
                "continue_final_message",
                "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            )
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise _FieldError(
                "continue_final_message",
                "continue_final_message needs the last message to be the assistant's.",
            )
        if self.logprobs or self.top_logprobs:
            raise _FieldError("logprobs", "logprobs are not supported by this engine; omit the field.")
        for message in self.messages:
            message.text()  # rejects non-text content parts here, as a 400
        self.forced_tool()  # a tool_choice that names no defined tool is a 400 here
        return self

    def forced_tool(self) -> dict[str, Any] | None:
        """The function the model must call (`tool_choice` "required": the first tool; a named function:
        that one), as the tool's `function` object; None when the model answers in text."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return None
        tools = self.tools or []
        if len(tools) > MAX_TOOLS:
            raise _FieldError("tools", f"at most {MAX_TOOLS} tools are accepted.")
        functions = [tool.get("function") for tool in tools if isinstance(tool, dict)]
        functions = [f for f in functions if isinstance(f, dict) and isinstance(f.get("name"), str)]
        if choice == "required":
            if not functions:
                raise _FieldError("tool_choice", "tool_choice 'required' needs at least one tool in `tools`.")
            return functions[0]
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            name = choice["function"].get("name")
            for function in functions:
                if function["name"] == name:
                    return function
            raise _FieldError("tool_choice", f"tool_choice names the function {name!r}, which `tools` lacks.")
        raise _FieldError(
            "tool_choice", "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', ...}."
        )

    @property
    def output_limit(self) -> int | None:
        """vLLM prefers max_completion_tokens (the current OpenAI name) over the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


RequestT = TypeVar("RequestT", CompletionRequest, ChatCompletionRequest)


class _FieldError(InputError):
    """A validation failure that names its field, so the 400 carries OpenAI's `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _text_part(part: dict[str, Any]) -> str:
    if part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise _FieldError(
            "messages",
            f"content part of type {part.get('type')!r} is not supported: this model reads text only.",
        )
    return str(part["text"])


def parse_completion_request(body: bytes) -> CompletionRequest:
    return _parse(CompletionRequest, body)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object; anything else is vLLM's 400."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise APIError(400, f"The request body is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return data


def _parse(kind: type[RequestT], body: bytes) -> RequestT:
    data = json_object(body)
    try:
        return kind.model_validate(data)
    except ValidationError as error:
        raise _as_api_error(error) from None


def _as_api_error(error: ValidationError) -> APIError:
    details = error.errors(include_url=False)
    first = details[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, _FieldError):
        return APIError(400, str(cause), param=cause.param)
    messages = []
    for detail in details:
        where = ".".join(str(part) for part in detail["loc"])
        messages.append(f"{where}: {detail['msg']}" if where else str(detail["msg"]))
    param = str(first["loc"][0]) if first["loc"] else None
    return APIError(400, "; ".join(messages), param=param)


# ---------------------------------------------------------------------------------------------------
# errors vLLM answers with


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param="model", error_type="NotFoundError")


def prompt_too_long(max_model_len: int, prompt_len: int) -> APIError:
    return APIError(
        400,
        f"This model's maximum context length is {max_model_len} tokens. However, your request has "
        f"{prompt_len} input tokens. Please reduce the length of the input messages.",
        param="input_tokens",
    )


def output_too_long(max_model_len: int, prompt_len: int, max_tokens: int) -> APIError:
    return APIError(
        400,
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
        f"context length is {max_model_len} tokens and your request has {prompt_len} input tokens "
        f"({max_tokens} > {max_model_len} - {prompt_len}).",
        param="max_tokens",
    )


# ---------------------------------------------------------------------------------------------------
# responses, in vLLM's layout


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now_created() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


def completion_response(
    response_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None,
    usage_info: dict[str, Any],
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
                "prompt_logprobs": None,
            }
        ],
        "usage": usage_info,
    }


def completion_chunk(
    response_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    stop_reason: str | int | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
    }


def chat_response(
    response_id: str,
    created: int,
    model: str,
    content: str | None,
    finish_reason: str | None,
    usage_info: dict[str, Any],
    *,
    stop_reason: str | int | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": content,
                    "reasoning_content": None,
                    "tool_calls": tool_calls or [],
                },
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason,
            }
        ],
        "usage": usage_info,
        "prompt_logprobs": None,
    }


def chat_chunk(
    response_id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    """One streamed chat delta. vLLM's first chunk is `{"role": "assistant", "content": ""}`."""
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(
    obj: Literal["text_completion", "chat.completion.chunk"],
    response_id: str,
    created: int,
    model: str,
    usage_info: dict[str, Any],
) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, only usage."""
    return {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_info,
    }


def model_card(
    model_id: str, root: str, created: int, *, parent: str | None = None, max_model_len: int | None = None
) -> dict[str, Any]:
    """vLLM's ModelCard: a base model has `root` = its path and no parent; an adapter has `root` = its
    path and `parent` = the base model's name."""
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


def model_list(cards: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "data": cards}
