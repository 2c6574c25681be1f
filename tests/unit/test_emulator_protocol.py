"""Request parsing into typed objects with clear 400s, and vLLM's response layouts."""

from __future__ import annotations

import orjson
import pytest

from fleetserve.protocol import openai
from fleetserve.protocol.errors import APIError


def chat_body(**fields: object) -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_request_reads_vllm_fields_and_ignores_unknown_ones() -> None:
    request = openai.parse_chat_request(
        chat_body(
            max_completion_tokens=9,
            max_tokens=3,
            ignore_eos=True,
            min_tokens=2,
            stream=True,
            stream_options={"include_usage": True},
            some_future_field={"x": 1},
        )
    )
    assert request.output_limit == 9  # max_completion_tokens wins, as in vLLM
    assert request.ignore_eos and request.min_tokens == 2 and request.include_usage


def test_text_content_parts_are_joined() -> None:
    body = orjson.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ]
        }
    )
    assert openai.parse_chat_request(body).messages[0].text() == "ab"


def test_completion_prompt_forms() -> None:
    assert openai.parse_completion_request(b'{"prompt": "x"}').prompt == "x"
    assert openai.parse_completion_request(b'{"prompt": [5, 6]}').prompt == [5, 6]
    assert openai.parse_completion_request(b'{"prompt": [[5, 6]]}').prompt == [5, 6]
    assert openai.parse_completion_request(b'{"prompt": ["only"]}').prompt == "only"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{nope", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens", "at least 1"),
        (b'{"prompt": "x", "max_tokens": 4, "min_tokens": 5}', "min_tokens", "less than or equal"),
        (b'{"prompt": "x", "n": 3}', "n", "n must be 1"),
        (b'{"prompt": "x", "temperature": -1}', "temperature", "greater than or equal"),
        (b'{"prompt": "x", "temperature": 2.5}', "temperature", "less than or equal"),
        (b'{"prompt": "x", "logprobs": 2}', "logprobs", "not supported"),
        (b'{"prompt": "x", "echo": true}', "echo", "not supported"),
        (b'{"prompt": ["a", "b"]}', "prompt", "one prompt"),
        (b'{"prompt": []}', "prompt", "must not be empty"),
        (b'{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options", "stream=True"),
        (b'{"max_tokens": 3}', "prompt", "Field required"),
        (b'{"prompt": "x", "max_tokens": "many"}', "max_tokens", "integer"),
    ],
)
def test_bad_completion_requests_are_400_naming_the_field(
    body: bytes, param: str | None, fragment: str
) -> None:
    with pytest.raises(APIError) as caught:
        openai.parse_completion_request(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert fragment in caught.value.message
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"messages": []}, "at least 1"),
        ({"logprobs": True}, "logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens must be at least 1"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "text only"),
    ],
)
def test_bad_chat_requests_are_400(fields: dict[str, object], fragment: str) -> None:
    with pytest.raises(APIError, match=fragment) as caught:
        openai.parse_chat_request(chat_body(**fields))
    assert caught.value.status == 400


def test_vllm_error_messages() -> None:
    assert openai.model_not_found("x").status == 404
    assert openai.model_not_found("x").message == "The model `x` does not exist."
    too_long = openai.prompt_too_long(4096, 5000)
    assert too_long.status == 400 and "maximum context length is 4096 tokens" in too_long.message
    assert "5000 input tokens" in too_long.message
    assert "(100 > 4096 - 4000)" in openai.output_too_long(4096, 4000, 100).message


def test_response_layouts() -> None:
    usage = openai.usage(10, 3)
    assert usage["total_tokens"] == 13
    response = openai.chat_response("chatcmpl-1", 5, "m", "hello", "stop", usage)
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {
        "role": "assistant",
        "content": "hello",
        "reasoning_content": None,
        "tool_calls": [],
    }
    chunk = openai.chat_chunk("chatcmpl-1", 5, "m", {"content": "x"}, "length")
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["finish_reason"] == "length"
    assert "usage" not in chunk
    final = openai.usage_chunk("text_completion", "cmpl-1", 5, "m", usage)
    assert final["choices"] == [] and final["usage"] == usage
    card = openai.model_card("lora-a", "/path", 5, parent="m")
    assert card["object"] == "model" and card["parent"] == "m" and card["root"] == "/path"
    assert openai.model_list([card]) == {"object": "list", "data": [card]}
