"""Continuing a streamed completion on another engine, in OpenAI's shapes.

When an engine fails after the client has part of a stream, the gateway asks another engine to go on
from where the first stopped and splices its stream into the client's. This module is the protocol side
of that, free of HTTP: whether a request can be continued faithfully (`unresumable_reason`), what the
client has received so far (`read_transcript` over the events it was sent), the continuation request
(`continuation`: the prompt plus the text so far, or the conversation with the partial assistant message
to continue), and `Splice`, which rewrites the continuation's events so the client sees one stream: the
first stream's `id`, `created` and `model`; no second role delta; usage counting the prompt once and
every completion token; and, when the client asked, `x_fleetserve: {"resumed": k}` in the last chunk.

Token counts: `completion_tokens` so far is the stream's own continuous usage when it carried one, else
the number of events with text (vLLM, SGLang and llama.cpp send one token per event by default; an
engine started with a larger stream interval undercounts). The continuation's prompt holds the text so
far, which the destination counts as prompt tokens: the spliced usage subtracts the tokens so far from
its prompt count, exact when the text re-tokenizes to as many tokens as it was generated in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

Kind = Literal["chat", "completions"]
# how the destination continues a chat: the chat API with vLLM's continue_final_message, or the
# completions API over the conversation rendered by the model's chat template (llama.cpp's server
# renders every conversation with a fresh assistant turn, so it cannot continue one)
ChatStyle = Literal["continue_final_message", "rendered"]
ChatRenderer = Callable[[list[dict[str, Any]]], str]

MAX_TRANSCRIPT_BYTES = 8 << 20  # a longer stream is not recorded and so not resumed: memory stays bounded
_DATA = b"data: "
_DONE_PAYLOAD = b"[DONE]"


@dataclass(frozen=True, slots=True)
class Transcript:
    """What the client has received of a stream."""

    response_id: str | None
    created: int | None
    model: str | None
    text: str
    tokens: int
    role_sent: bool  # a chat stream's first delta (the assistant role) has gone out
    finish_reason: str | None  # set when the answer was complete and only its tail went missing
    tool_calls: bool


def unresumable_reason(payload: Mapping[str, Any], kind: Kind) -> str | None:
    """Why a request cannot be continued faithfully on another engine, or None when it can."""
    n = payload.get("n")
    if n not in (None, 1):
        return "n > 1"
    if payload.get("logprobs") or payload.get("top_logprobs"):
        return "logprobs"
    if payload.get("seed") is not None:
        return "a seed the client set"  # the continuation would not be the seeded sample
    if kind == "completions":
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return "a prompt of token ids"
        if payload.get("echo") or payload.get("best_of") not in (None, 1) or payload.get("suffix"):
            return "echo, best_of or suffix"
    return None


def read_transcript(events: bytes) -> Transcript:
    """Parse the events a client was sent (whole events only) into what it has so far."""
    response_id: str | None = None
    created: int | None = None
    model: str | None = None
    pieces: list[str] = []
    counted = 0
    usage_tokens: int | None = None
    role_sent = tool_calls = False
    finish_reason: str | None = None
    for payload in _payloads(events):
        chunk = _loads(payload)
        if chunk is None:
            continue
        response_id = response_id or _str(chunk.get("id"))
        created = created if created is not None else _int(chunk.get("created"))
        model = model or _str(chunk.get("model"))
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            usage_tokens = usage["completion_tokens"]
        for choice in _choices(chunk):
            delta = choice.get("delta")
            if isinstance(delta, dict):
                role_sent = role_sent or "role" in delta
                tool_calls = tool_calls or bool(delta.get("tool_calls"))
                text = delta.get("content")
            else:
                text = choice.get("text")
            if isinstance(text, str) and text:
                pieces.append(text)
                counted += 1
            finish_reason = _str(choice.get("finish_reason")) or finish_reason
    tokens = usage_tokens if usage_tokens is not None else counted
    return Transcript(
        response_id, created, model, "".join(pieces), tokens, role_sent, finish_reason, tool_calls
    )


@dataclass(frozen=True, slots=True)
class Continuation:
    path: str
    body: dict[str, Any]
    as_completion: bool  # a chat continued through the completions API: its chunks are converted back


def continuation(
    payload: Mapping[str, Any],
    kind: Kind,
    so_far: Transcript,
    *,
    chat_style: ChatStyle = "continue_final_message",
    render: ChatRenderer | None = None,
) -> Continuation:
    """The request that makes another engine go on from `so_far`. It always asks for usage, so the
    spliced stream can count every token (the client sees usage only when it asked)."""
    body = dict(payload)
    body["stream"] = True
    options = body.get("stream_options")
    body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    for field in ("max_completion_tokens", "max_tokens"):
        if isinstance(body.get(field), int):
            body[field] = max(1, body[field] - so_far.tokens)
    if isinstance(body.get("min_tokens"), int):
        body["min_tokens"] = max(0, body["min_tokens"] - so_far.tokens)
    if kind == "completions":
        prompt = body["prompt"]
        body["prompt"] = (prompt[0] if isinstance(prompt, list) else prompt) + so_far.text
        return Continuation("/v1/completions", body, as_completion=False)
    messages = list(body["messages"])
    if chat_style == "rendered":
        if render is None:
            raise ValueError("a rendered chat continuation needs the model's chat template")
        completion = {key: body[key] for key in _COMPLETION_FIELDS if key in body}
        if "max_completion_tokens" in body:
            completion["max_tokens"] = body["max_completion_tokens"]
        completion["prompt"] = render(messages) + so_far.text
        return Continuation("/v1/completions", completion, as_completion=True)
    body["messages"] = [*messages, {"role": "assistant", "content": so_far.text}]
    body["continue_final_message"] = True
    body["add_generation_prompt"] = False
    return Continuation("/v1/chat/completions", body, as_completion=False)


# the fields a chat request shares with a completions request
_COMPLETION_FIELDS = (
    "model",
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "ignore_eos",
    "presence_penalty",
    "frequency_penalty",
    "stream",
    "stream_options",
    "user",
)


class Splice:
    """Rewrites a continuation's SSE events into the client's stream (see the module docstring).

    `feed` takes whole events and returns the bytes to send; `completion_tokens` is the answer's total
    so far, which the next resume (if the continuation fails too) starts from.
    """

    def __init__(
        self,
        kind: Kind,
        so_far: Transcript,
        *,
        as_completion: bool,
        client_usage: bool,
        client_continuous_usage: bool,
        report_resumes: int | None,
    ) -> None:
        """`report_resumes`: the resume count to put in the last chunk, None when the client did not
        ask for it."""
        self._kind = kind
        self._so_far = so_far
        self._as_completion = as_completion
        self._client_usage = client_usage
        self._continuous = client_continuous_usage
        self._report = report_resumes
        self._role_sent = so_far.role_sent
        self._counted = 0
        self._usage_tokens: int | None = None
        self.finish_reason: str | None = None

    @property
    def completion_tokens(self) -> int:
        new = self._usage_tokens if self._usage_tokens is not None else self._counted
        return self._so_far.tokens + new

    def feed(self, events: bytes) -> bytes:
        out: list[bytes] = []
        for payload in _payloads(events):
            if payload == _DONE_PAYLOAD:
                out.append(b"data: [DONE]\n\n")
                continue
            chunk = _loads(payload)
            if chunk is None or "error" in chunk:
                out.append(_DATA + payload + b"\n\n")  # the continuation's own failure, as it said it
                continue
            rewritten = self._rewrite(chunk)
            if rewritten is not None:
                out.append(_DATA + orjson.dumps(rewritten) + b"\n\n")
        return b"".join(out)

    def _rewrite(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        so_far = self._so_far
        if self._as_completion:
            chunk = _as_chat_chunk(chunk)
        for key, value in (("id", so_far.response_id), ("created", so_far.created), ("model", so_far.model)):
            if value is not None:
                chunk[key] = value
        choices = []
        for choice in _choices(chunk):
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(delta, dict) and "role" in delta:
                if (
                    self._role_sent
                    and not text
                    and not delta.get("tool_calls")
                    and not choice.get("finish_reason")
                ):
                    continue  # the client already has the assistant's role
                if self._role_sent:
                    choice["delta"] = {key: value for key, value in delta.items() if key != "role"}
                self._role_sent = True
            if isinstance(text, str) and text:
                self._counted += 1
            self.finish_reason = _str(choice.get("finish_reason")) or self.finish_reason
            choices.append(choice)
        usage = chunk.pop("usage", None)
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            self._usage_tokens = usage["completion_tokens"]
        is_usage_chunk = not choices and usage is not None
        if is_usage_chunk and not self._client_usage:
            return None
        if not choices and not is_usage_chunk:
            return None
        chunk["choices"] = choices
        if isinstance(usage, dict) and (is_usage_chunk or self._continuous):
            chunk["usage"] = self._spliced_usage(usage)
        last = is_usage_chunk if self._client_usage else self.finish_reason is not None and choices
        if last and self._report is not None:
            chunk["x_fleetserve"] = {"resumed": self._report}
        return chunk

    def _spliced_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        prompt = usage.get("prompt_tokens")
        completion = self.completion_tokens
        prompt_once = max(0, prompt - self._so_far.tokens) if isinstance(prompt, int) else 0
        return {
            **usage,
            "prompt_tokens": prompt_once,
            "completion_tokens": completion,
            "total_tokens": prompt_once + completion,
        }


def _as_chat_chunk(chunk: dict[str, Any]) -> dict[str, Any]:
    """A completions chunk (a chat continued through the completions API) as a chat chunk."""
    choices = []
    for choice in _choices(chunk):
        text = choice.get("text")
        delta = {"content": text} if isinstance(text, str) else {}
        choices.append({"index": 0, "delta": delta, "finish_reason": choice.get("finish_reason")})
    converted = {**chunk, "object": "chat.completion.chunk", "choices": choices}
    return converted


def _payloads(events: bytes) -> list[bytes]:
    payloads = []
    for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = [line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if data:
            payloads.append(b"\n".join(data))
    return payloads


def _loads(payload: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _choices(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice for choice in choices if isinstance(choice, dict)]


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
