"""The gateway's OpenAI surface, end to end: real upstream processes, a real `fleetserve serve`
process, and the official openai client."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from tests.helpers import wait_until
from tests.integration.gateway_harness import Processes, get_json, metric_value, running_processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


MESSAGES = [{"role": "user", "content": "hello"}]


def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0)


def test_chat_and_completions_streaming_and_not(procs: Processes) -> None:
    a, b = procs.upstream("a"), procs.upstream("b")
    gateway = procs.gateway([a, b], router={"policy": "round_robin"})
    api = client(gateway.url)

    raw = api.chat.completions.with_raw_response.create(model="test-model", messages=MESSAGES, max_tokens=3)
    assert raw.parse().choices[0].message.content == "t0 t1 t2"
    assert raw.headers["x-fleetserve-route"] == "a;round_robin"

    chunks = list(
        api.chat.completions.create(model="test-model", messages=MESSAGES, stream=True, max_tokens=4)
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "t0 t1 t2 t3 "
    assert {c.system_fingerprint for c in chunks} == {"b"}

    assert api.completions.create(model="test-model", prompt="hi", max_tokens=2).choices[0].text == "t0 t1"
    streamed = api.completions.create(model="test-model", prompt="hi", stream=True, max_tokens=3)
    assert "".join(c.choices[0].text for c in streamed) == "t0 t1 t2 "

    assert metric_value(gateway, "fleetserve_gateway_requests_total", model="test-model", status="200") == 4
    decisions = metric_value(gateway, "fleetserve_gateway_routing_decisions_total", policy="round_robin")
    assert decisions == 4
    assert (
        metric_value(gateway, "fleetserve_gateway_time_to_first_token_seconds_count", model="test-model") == 4
    )


def test_models_are_the_deduplicated_union_with_adapters(procs: Processes) -> None:
    a = procs.upstream("a", adapters=("sql-lora",))
    b = procs.upstream("b", adapters=("sql-lora", "chat-lora"))
    other = procs.upstream("c", model="other-model")
    gateway = procs.gateway(
        [a, b, {"name": "c", "model": "other-model", "url": other.url, "adapters": ["configured-lora"]}]
    )
    wait_until(lambda: len(get_json(gateway.url + "/v1/models")["data"]) == 5, message="all engines listed")
    models = {m.id: m for m in client(gateway.url).models.list()}
    assert sorted(models) == ["chat-lora", "configured-lora", "other-model", "sql-lora", "test-model"]
    assert models["chat-lora"].model_extra["parent"] == "test-model"
    assert models["configured-lora"].model_extra["parent"] == "other-model"


def test_adapter_requests_go_only_to_engines_with_the_adapter(procs: Processes) -> None:
    plain, with_adapter = procs.upstream("plain"), procs.upstream("lora", adapters=("sql-lora",))
    gateway = procs.gateway([plain, with_adapter], router={"policy": "round_robin"})
    api = client(gateway.url)
    wait_until(lambda: "sql-lora" in {m.id for m in api.models.list()}, message="adapter discovered")
    for _ in range(4):
        raw = api.chat.completions.with_raw_response.create(model="sql-lora", messages=MESSAGES, max_tokens=1)
        assert raw.headers["x-fleetserve-route"].startswith("lora;")


def test_unknown_model_is_an_openai_404(procs: Processes) -> None:
    gateway = procs.gateway([procs.upstream("a")])
    with pytest.raises(openai.NotFoundError) as caught:
        client(gateway.url).chat.completions.create(model="no-such-model", messages=MESSAGES)
    error = caught.value.body
    assert error["type"] == "NotFoundError" and "no-such-model" in error["message"]
    assert error["param"] == "model"


def test_malformed_and_invalid_requests_are_400(procs: Processes) -> None:
    gateway = procs.gateway([procs.upstream("a")])
    url = gateway.url + "/v1/chat/completions"
    broken = httpx.post(url, content=b'{"model": "test-model", "messages": [', headers=_json)
    assert broken.status_code == 400
    assert "not valid JSON" in broken.json()["error"]["message"]
    no_messages = httpx.post(url, json={"model": "test-model"})
    assert no_messages.status_code == 400 and no_messages.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client(gateway.url).chat.completions.create(model="test-model", messages=MESSAGES, max_tokens=-5)
    assert caught.value.body["param"] == "max_tokens"


def test_body_over_the_limit_is_413(procs: Processes) -> None:
    gateway = procs.gateway([procs.upstream("a")], max_body_bytes=2048)
    with pytest.raises(openai.APIStatusError) as caught:
        client(gateway.url).chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "x" * 4096}]
        )
    assert caught.value.status_code == 413
    assert caught.value.body["type"] == "RequestEntityTooLargeError"
    # a chunked body (no content-length) is cut off while it is read
    chunked = httpx.post(gateway.url + "/v1/completions", content=iter([b'{"prompt": "', b"y" * 4096, b'"}']))
    assert chunked.status_code == 413


def test_full_queue_is_429_with_retry_after(procs: Processes) -> None:
    slow = procs.upstream("slow", chunk_delay_ms=300)
    gateway = procs.gateway([slow], max_queue=2)
    api = client(gateway.url)
    finished: list[str] = []

    def stream() -> None:
        chunks = api.chat.completions.create(model="test-model", messages=MESSAGES, stream=True, max_tokens=4)
        finished.append("".join(c.choices[0].delta.content or "" for c in chunks))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: metric_value(gateway, "fleetserve_gateway_requests_in_flight") == 2, message="queue full"
    )
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(model="test-model", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "1"
    for thread in threads:
        thread.join(timeout=30)
    assert finished == ["t0 t1 t2 t3 "] * 2
    assert metric_value(gateway, "fleetserve_gateway_requests_total", status="429") == 1


def test_policy_header_only_when_allowed(procs: Processes) -> None:
    upstream = procs.upstream("a")
    strict = procs.gateway([upstream], router={"policy": "round_robin"})
    open_gateway = procs.gateway([upstream], router={"policy": "round_robin", "allow_policy_header": True})
    header = {"x-fleetserve-policy": "least_kv"}
    ignored = client(strict.url).chat.completions.with_raw_response.create(
        model="test-model", messages=MESSAGES, extra_headers=header
    )
    assert ignored.headers["x-fleetserve-route"] == "a;round_robin"
    honoured = client(open_gateway.url).chat.completions.with_raw_response.create(
        model="test-model", messages=MESSAGES, extra_headers=header
    )
    assert honoured.headers["x-fleetserve-route"] == "a;least_kv"
    with pytest.raises(openai.BadRequestError, match="unknown routing policy"):
        client(open_gateway.url).chat.completions.create(
            model="test-model", messages=MESSAGES, extra_headers={"x-fleetserve-policy": "nope"}
        )


def test_health_ready_and_engine_metrics(procs: Processes) -> None:
    upstream = procs.upstream("a")
    gateway = procs.gateway([upstream])
    assert get_json(gateway.url + "/health") == {"status": "ok"}
    assert get_json(gateway.url + "/ready") == {"ready": True}
    assert metric_value(gateway, "fleetserve_engine_routable", engine="a") == 1
    wait_until(lambda: metric_value(gateway, "fleetserve_engine_kv_usage", engine="a") is not None)
    upstream.kill()
    wait_until(
        lambda: _status(gateway.url + "/ready") == 503, timeout=20, message="not ready without engines"
    )


_json = {"content-type": "application/json"}


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
