"""What the emulated engine writes when a request constrains it: stop strings and stop tokens, JSON for a
response_format, forced tool calls, and text that tokenizes back to the tokens it counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from tests.unit.test_fleet_tokenizer import make_tokenizer_json

from fleetserve.engines.emulator.engine import EmulatedEngine, EmulatorSpec
from fleetserve.engines.emulator.structured import json_from_schema
from fleetserve.engines.emulator.text import PlannedOutput, Vocabulary, words_until_stop
from fleetserve.protocol.errors import APIError
from fleetserve.protocol.tokenizer import HashTokenizer, json_tokenizer

VOCABULARY = Vocabulary.for_tokenizer(HashTokenizer(32000))
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 3, "maxLength": 8},
        "age": {"type": "integer", "minimum": 18, "exclusiveMaximum": 30},
        "score": {"type": "number", "minimum": 0.5, "maximum": 1.0},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 2, "maxItems": 4},
        "kind": {"anyOf": [{"const": "admin"}, {"type": "null"}]},
        "address": {"$ref": "#/$defs/address"},
        "active": {"type": ["boolean", "null"]},
    },
    "required": ["name", "age", "nickname"],
    "$defs": {"address": {"type": "object", "properties": {"zip": {"type": "string"}}, "required": ["zip"]}},
}


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_generated_json_is_valid_for_its_schema(seed: int) -> None:
    jsonschema.validate(json_from_schema(PERSON, seed, "response_format"), PERSON)


@pytest.mark.parametrize("keyword", [{"pattern": "^a+$"}, {"not": {"type": "null"}}, {"if": {}}])
def test_keywords_the_emulator_cannot_honour_are_a_400_naming_them(keyword: dict[str, Any]) -> None:
    with pytest.raises(APIError) as error:
        json_from_schema({"type": "string", **keyword}, 0, "response_format")
    assert error.value.status == 400 and next(iter(keyword)) in error.value.message


def full_text(seed: int, plan: PlannedOutput) -> str:
    _, text = words_until_stop(seed, plan, VOCABULARY, [], [])
    return text.take(plan.num_tokens)


@settings(max_examples=50)
@given(st.integers(min_value=0, max_value=2**32), st.sampled_from(["the", " of", "e", "x y"]))
def test_a_stop_string_ends_the_answer_before_it(seed: int, stop: str) -> None:
    plan = PlannedOutput(400, "length")
    cut, text = words_until_stop(seed, plan, VOCABULARY, [stop], [])
    answer = text.take(cut.num_tokens)
    uncut = full_text(seed, plan)
    assert stop not in answer and uncut.startswith(answer)
    if cut.finish_reason == "stop":
        assert cut.stop_reason == stop and uncut[len(answer) :].startswith(stop)
    else:
        assert cut == plan and stop not in uncut


def test_a_stop_token_ends_the_answer_and_is_not_in_the_text() -> None:
    plan = PlannedOutput(300, "length")
    first_word = full_text(3, plan).split(" ")[5]
    token = HashTokenizer(32000).encode(" " + first_word)[0]
    cut, text = words_until_stop(3, plan, VOCABULARY, [], [token])
    assert cut.finish_reason == "stop" and cut.stop_reason == token
    assert len(text.take(cut.num_tokens).split()) == cut.num_tokens - 1


@pytest.fixture
def emulated() -> Any:
    spec = EmulatorSpec(gpu="h100-80g", model="llama-3-8b", time_scale=0.01)
    emulator = EmulatedEngine(spec)
    with TestClient(emulator.app) as client:
        client.portal.call(emulator.start)  # type: ignore[union-attr]
        yield client
        client.portal.call(emulator.stop)  # type: ignore[union-attr]


def test_response_format_and_forced_tools_through_http(emulated: TestClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    answer = emulated.post(
        "/v1/chat/completions",
        json={"model": "llama-3-8b", "messages": messages, "response_format": schema_format},
    ).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), PERSON)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": PERSON}}]
    for choice, finish in (
        ("required", "tool_calls"),
        ({"type": "function", "function": {"name": "lookup"}}, "stop"),
    ):
        body = {"model": "llama-3-8b", "messages": messages, "tools": tools, "tool_choice": choice}
        reply = emulated.post("/v1/chat/completions", json=body).json()["choices"][0]
        (call,) = reply["message"]["tool_calls"]
        assert call["function"]["name"] == "lookup" and reply["finish_reason"] == finish
        jsonschema.validate(json.loads(call["function"]["arguments"]), PERSON)
    missing = {"model": "llama-3-8b", "messages": messages, "tools": tools}
    missing["tool_choice"] = {"type": "function", "function": {"name": "other"}}
    refused = emulated.post("/v1/chat/completions", json=missing)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"
    assert (
        emulated.post("/v1/completions", json={"model": "llama-3-8b", "prompt": "x"}).json()["usage"][
            "completion_tokens"
        ]
        <= 16
    )
    for body in ({"seed": 2**63}, {"stream": None, "echo": None, "n": None}):
        status = emulated.post(
            "/v1/completions", json={"model": "llama-3-8b", "prompt": "x", **body}
        ).status_code
        assert status == (400 if "seed" in body else 200)


def test_streamed_text_tokenizes_back_to_the_counted_tokens(tmp_path: Path) -> None:
    path = make_tokenizer_json(tmp_path / "tokenizer.json", vocab_size=400)
    emulator = EmulatedEngine(
        EmulatorSpec(gpu="h100-80g", model="llama-3-8b", time_scale=0.01, tokenizer_file=str(path))
    )
    tokenizer = json_tokenizer(path)
    with TestClient(emulator.app) as client:
        client.portal.call(emulator.start)  # type: ignore[union-attr]
        body = {"model": "llama-3-8b", "prompt": "The quick brown fox", "max_tokens": 60, "ignore_eos": True}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        events = [
            json.loads(line[6:])
            for line in client.post("/v1/completions", json=body).text.splitlines()
            if line.startswith("data: {")
        ]
        client.portal.call(emulator.stop)  # type: ignore[union-attr]
    pieces = [event["choices"][0]["text"] for event in events if event["choices"]]
    counted = events[-1]["usage"]["completion_tokens"]
    assert counted == 60 and len(pieces) == 60
    assert len(tokenizer.encode("".join(pieces))) == counted
    assert all(len(tokenizer.encode(piece)) == 1 for piece in pieces)
