"""schemathesis, driven by OpenAI's own OpenAPI document, against `fleetserve serve` over emulated engines.

Checked on every generated request: no 5xx; every error OpenAI-shaped JSON; every 200 valid against
OpenAI's response schema with the content type it documents, and every event of a stream valid against
OpenAI's schema for stream events, ending with `data: [DONE]`. Not checked: `status_code_conformance`,
because OpenAI's document lists only 200 for these operations while every real server (OpenAI's too)
answers 400, 404, 413 or 429 where the request calls for it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance
from tests.conformance.openai_spec import OPERATIONS, STREAM_EVENT_SCHEMAS, as_json_schema, trimmed_spec
from tests.integration.gateway_harness import emulated_gateway

MODEL = "llama-3-8b"
EXAMPLES = 100  # per operation


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("conformance")
    # time_scale 0.01: answers a hundred times faster than an H100 would, so many examples fit in CI
    group = {"name": "h100", "gpu": "h100-80g", "model": MODEL, "replicas": 2, "time_scale": 0.01}
    with emulated_gateway(tmp, group) as url:
        yield url


def openai_shaped_errors(ctx: object, response: object, case: object) -> None:
    """Every answer that is not a 200 is `{"error": {"message", "type", "param", "code"}}` JSON."""
    status = response.status_code  # type: ignore[attr-defined]
    if status == 200:
        return
    assert response.headers["content-type"][0].startswith("application/json"), response.text  # type: ignore[attr-defined]
    error = json.loads(response.content)["error"]  # type: ignore[attr-defined]
    assert isinstance(error["message"], str) and error["message"]
    assert {"type", "param", "code"} <= error.keys()


def stream_events_conform(spec: dict) -> object:
    """A check that validates every `data:` payload of a 200 stream against OpenAI's event schema."""
    validators = {
        path: jsonschema.Draft202012Validator(
            {**as_json_schema(spec), "$ref": f"#/components/schemas/{name}"}
        )
        for path, name in STREAM_EVENT_SCHEMAS.items()
    }

    def check(ctx: object, response: object, case: schemathesis.Case) -> None:
        content_type = response.headers.get("content-type", [""])[0]  # type: ignore[attr-defined]
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):  # type: ignore[attr-defined]
            return
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]  # type: ignore[attr-defined]
        # schemathesis stops reading a long stream after a number of whole events
        if not response.stream_cut_short:  # type: ignore[attr-defined]
            assert events and events[-1] == "[DONE]", events[-1:]
        validator = validators[case.operation.path]
        for position, event in enumerate(events):
            if event == "[DONE]":
                continue
            problem = jsonschema.exceptions.best_match(validator.iter_errors(json.loads(event)))
            assert problem is None, (
                f"event {position} of {len(events)} violates the schema: {problem}\n{event}"
            )

    return check


def checks_for(spec: dict) -> list:
    return [
        not_a_server_error,
        response_schema_conformance,
        content_type_conformance,
        openai_shaped_errors,
        stream_events_conform(spec),
    ]


# generated bodies rarely stream (`stream` is optional and defaults to false), so streams get their own cases
STREAMS = {
    "/chat/completions": [
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 12},
        {
            "model": MODEL,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 20,
            "stop": ["the"],
        },
    ],
    "/completions": [
        {"model": MODEL, "prompt": "once upon a time", "stream": True, "max_tokens": 16},
        {"model": MODEL, "prompt": [1, 2, 3], "stream": True, "stream_options": {"include_usage": True}},
    ],
}


@pytest.mark.parametrize("path", sorted(STREAMS))
def test_streams_conform_to_openais_stream_schemas(gateway: str, path: str) -> None:
    spec = trimmed_spec(MODEL)
    operation = schemathesis.openapi.from_dict(spec)[path]["post"]
    for body in STREAMS[path]:
        case = operation.Case(body=body, media_type="application/json")
        response = case.call_and_validate(base_url=gateway + "/v1", checks=checks_for(spec), timeout=30)
        assert response.status_code == 200
        assert response.headers["content-type"][0].startswith("text/event-stream")


def test_a_forced_tool_call_conforms(gateway: str) -> None:
    """Generated cases reach a forced tool call only now and then; this one always does."""
    spec = trimmed_spec(MODEL)
    operation = schemathesis.openapi.from_dict(spec)["/chat/completions"]["post"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "what is the weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "tool_choice": "required",
    }
    case = operation.Case(body=body, media_type="application/json")
    response = case.call_and_validate(base_url=gateway + "/v1", checks=checks_for(spec), timeout=30)
    assert response.json()["choices"][0]["message"]["tool_calls"][0]["type"] == "function"


@pytest.mark.parametrize("path", sorted(OPERATIONS))
def test_the_gateway_conforms_to_openais_spec(gateway: str, path: str) -> None:
    spec = trimmed_spec(MODEL)
    schema = schemathesis.openapi.from_dict(spec)
    operation = schema[path][OPERATIONS[path]]
    checks = checks_for(spec)

    @given(operation.as_strategy())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces locally
    )
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=gateway + "/v1", checks=checks, timeout=30)
        statuses[response.status_code] += 1

    statuses: Counter[int] = Counter()
    check()
    # the run must have exercised the success path, not only refusals. Most generated completions bodies
    # ask for what the emulated engine refuses with a 400 (n > 1, echo, logprobs, best_of, suffix)
    assert statuses[200] >= 1, statuses
