"""JSON the emulated model 'writes' when a request constrains its output: `response_format` (json_object,
json_schema) and forced tool calls (`tool_choice: required` or a named function).

vLLM honours these with guided decoding, so a router tested against an emulator that ignored them would
learn nothing about them. The emulator generates, deterministically from the request's seed, a value that
is valid for the schema (the common JSON Schema keywords: type, properties, required, items, enum, const,
bounds on numbers, lengths of strings and arrays, anyOf/oneOf/allOf, $ref into $defs/definitions). A
keyword it cannot honour (such as `pattern`) is refused with a 400 that names it, rather than ignored.
"""

from __future__ import annotations

import random
from typing import Any

from fleetserve.protocol.errors import APIError

MAX_DEPTH = 8
_WORDS = ("alpha", "beta", "gamma", "delta", "kilo", "lima", "echo", "nova", "orbit", "pixel")
_UNSUPPORTED = ("pattern", "patternProperties", "not", "if", "dependentSchemas", "contains")
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def json_from_schema(schema: dict[str, Any], seed: int, param: str) -> Any:
    """A value valid for `schema`; APIError(400, param=param) for a schema the emulator cannot honour."""
    if not isinstance(schema, dict):
        raise APIError(400, "the JSON schema must be an object", param=param)
    return _Generator(schema, random.Random(seed), param).value(schema, 0)


class _Generator:
    def __init__(self, root: dict[str, Any], rng: random.Random, param: str) -> None:
        self._root = root
        self._rng = rng
        self._param = param

    def value(self, schema: Any, depth: int) -> Any:
        if schema is True or schema == {}:
            return self._word()
        if not isinstance(schema, dict):
            raise self._refuse(f"a schema must be an object or true, got {schema!r}")
        if depth > MAX_DEPTH:
            raise self._refuse(f"schemas nested deeper than {MAX_DEPTH} levels are not supported")
        for keyword in _UNSUPPORTED:
            if keyword in schema:
                raise self._refuse(f"the JSON schema keyword {keyword!r} is not supported by this engine")
        if "$ref" in schema:
            return self.value(self._resolve(schema["$ref"]), depth + 1)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            choices = schema["enum"]
            if not isinstance(choices, list) or not choices:
                raise self._refuse("`enum` must be a non-empty list")
            return choices[0]
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                options = schema[combinator]
                if not isinstance(options, list) or not options:
                    raise self._refuse(f"`{combinator}` must be a non-empty list")
                return self.value(options[0], depth + 1)
        if "allOf" in schema:
            return self.value(_merge(schema), depth + 1)
        kind = schema.get("type", "object" if "properties" in schema else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        generate = getattr(self, f"_{kind}", None)
        if generate is None:
            raise self._refuse(f"unknown JSON schema type {kind!r}")
        return generate(schema, depth)

    def _object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise self._refuse("`properties` must be an object")
        required = set(schema.get("required", ()))
        missing = required - properties.keys()
        if missing and schema.get("additionalProperties", True) is False:
            raise self._refuse(f"required properties {sorted(missing)} are not defined")
        # every defined property, so the answer shows the whole shape; required ones without a schema too
        out = {name: self.value(sub, depth + 1) for name, sub in properties.items()}
        for name in sorted(missing):
            out[name] = self._word()
        return out

    def _array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 1))
        high = int(schema.get("maxItems", max(low, 3)))
        if low > high:
            raise self._refuse(f"minItems {low} is greater than maxItems {high}")
        count = self._rng.randint(low, min(high, low + 3))
        items = schema.get("items", True)
        if isinstance(items, list):  # tuple validation (draft 4-7)
            return [self.value(item, depth + 1) for item in items]
        return [self.value(items, depth + 1) for _ in range(count)]

    def _string(self, schema: dict[str, Any], depth: int) -> str:
        low = int(schema.get("minLength", 0))
        high = int(schema.get("maxLength", max(low, 24)))
        if low > high:
            raise self._refuse(f"minLength {low} is greater than maxLength {high}")
        text = self._word()
        while len(text) < low:
            text += " " + self._word()
        return text[:high]

    def _integer(self, schema: dict[str, Any], depth: int) -> int:
        low, high = _bounds(schema, integer=True)
        if low > high:
            raise self._refuse(f"no integer lies within the bounds {low}..{high}")
        multiple = schema.get("multipleOf")
        value = self._rng.randint(int(low), int(min(high, low + 100)))
        if isinstance(multiple, int) and multiple > 0:
            value = -(-int(low) // multiple) * multiple
            if value > high:
                raise self._refuse(f"no multiple of {multiple} lies within the bounds {low}..{high}")
        return value

    def _number(self, schema: dict[str, Any], depth: int) -> float:
        if "multipleOf" in schema:
            return float(self._integer(schema, depth))
        low, high = _bounds(schema, integer=False)
        if low > high:
            raise self._refuse(f"no number lies within the bounds {low}..{high}")
        return round(self._rng.uniform(low, min(high, low + 100.0)), 3)

    def _boolean(self, schema: dict[str, Any], depth: int) -> bool:
        return self._rng.random() < 0.5

    def _null(self, schema: dict[str, Any], depth: int) -> None:
        return None

    def _resolve(self, ref: Any) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self._refuse(f"only local $ref values (#/...) are supported, got {ref!r}")
        node: Any = self._root
        for part in ref[2:].split("/"):
            if not isinstance(node, dict) or part not in node:
                raise self._refuse(f"$ref {ref!r} does not resolve")
            node = node[part]
        return node

    def _word(self) -> str:
        return self._rng.choice(_WORDS)

    def _refuse(self, message: str) -> APIError:
        return APIError(400, message, param=self._param)


def _merge(schema: dict[str, Any]) -> dict[str, Any]:
    """allOf of object schemas as one schema: the union of their properties and required lists."""
    merged: dict[str, Any] = {key: value for key, value in schema.items() if key != "allOf"}
    for part in schema["allOf"]:
        if not isinstance(part, dict):
            continue
        for key, value in part.items():
            if key == "properties":
                merged.setdefault("properties", {}).update(value)
            elif key == "required":
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _bounds(schema: dict[str, Any], *, integer: bool) -> tuple[float, float]:
    step = 1 if integer else 1e-3
    low = schema.get("minimum", 0)
    high = schema.get("maximum", low + 1000)
    if "exclusiveMinimum" in schema and not isinstance(schema["exclusiveMinimum"], bool):
        low = max(low, schema["exclusiveMinimum"] + step)
    if "exclusiveMaximum" in schema and not isinstance(schema["exclusiveMaximum"], bool):
        high = min(high, schema["exclusiveMaximum"] - step)
    if integer:
        low, high = -(-low // 1), high // 1
    return float(low), float(high)


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The schema a `response_format` asks for: None for plain text, any object for json_object."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _ANY_OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise APIError(400, "response_format.json_schema must be an object", param="response_format")
        schema = spec.get("schema", spec.get("json_schema"))
        return _ANY_OBJECT if schema is None else schema
    raise APIError(
        400,
        f"response_format.type must be text, json_object or json_schema, got {kind!r}",
        param="response_format",
    )
