"""Engines failing under the gateway, with real processes: killed before the first byte, killed
mid-stream, hanging; and a client that walks away."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from tests.helpers import wait_until
from tests.integration.gateway_harness import Process, Processes, control, metric_value, running_processes

MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0)


def test_engine_killed_before_first_byte_is_retried_elsewhere(procs: Processes) -> None:
    doomed, healthy = procs.upstream("doomed"), procs.upstream("healthy")
    gateway = procs.gateway([doomed, healthy], router={"policy": "round_robin"})
    control(doomed, mode="die_on_request")
    api = client(gateway.url)

    raw = api.chat.completions.with_raw_response.create(model="test-model", messages=MESSAGES, stream=True)
    assert raw.headers["x-fleetserve-route"] == "healthy;round_robin"
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse()) == "t0 t1 t2 t3 t4 "
    assert doomed.popen.wait(timeout=10) == 3  # the engine really died on the request
    assert metric_value(gateway, "fleetserve_gateway_retries_total") == 1
    assert metric_value(gateway, "fleetserve_gateway_upstream_errors_total", engine="doomed") == 1
    # later requests keep succeeding while the dead engine is being ejected
    for _ in range(3):
        assert api.completions.create(model="test-model", prompt="x", max_tokens=2).choices[0].text == "t0 t1"


def test_engine_killed_mid_stream_ends_that_stream_with_an_error_event(procs: Processes) -> None:
    dying = procs.upstream("dying", chunk_delay_ms=60)
    steady = procs.upstream("steady", chunk_delay_ms=60)
    gateway = procs.gateway([dying, steady], router={"policy": "round_robin"})
    control(dying, mode="die_mid_stream", die_after=2)
    api = client(gateway.url)

    steady_text: list[str] = []
    request = {"model": "test-model", "messages": MESSAGES, "stream": True, "max_tokens": 8}
    doomed_stream = api.chat.completions.create(**request)

    def read_steady() -> None:
        chunks = api.chat.completions.create(**request)
        steady_text.append("".join(c.choices[0].delta.content or "" for c in chunks))

    other = threading.Thread(target=read_steady)
    other.start()
    received = []
    with pytest.raises(openai.APIError, match="failed mid-stream"):
        for chunk in doomed_stream:
            received.append(chunk.choices[0].delta.content)
    other.join(timeout=30)
    assert received == ["t0 ", "t1 "]  # whole events only: the half-written third never reaches the client
    assert steady_text == ["t0 t1 t2 t3 t4 t5 t6 t7 "]

    # the raw stream ends with one error event and then a clean [DONE]
    raw_engine = procs.upstream("raw", chunk_delay_ms=1)
    raw_gateway = procs.gateway([raw_engine])
    control(raw_engine, mode="die_mid_stream", die_after=1)
    body = {"model": "test-model", "messages": MESSAGES, "stream": True, "max_tokens": 5}
    text = httpx.post(raw_gateway.url + "/v1/chat/completions", json=body, timeout=10).text
    events = [event for event in text.split("\n\n") if event]
    assert events[-1] == "data: [DONE]"
    assert events[-2].startswith('data: {"error":') and '"code":502' in events[-2]
    assert len(events) == 3


def test_hanging_engine_times_out_is_ejected_and_recovers(procs: Processes) -> None:
    stuck, healthy = procs.upstream("stuck"), procs.upstream("healthy")
    gateway = procs.gateway(
        [stuck, healthy],
        router={"policy": "round_robin"},
        first_token_timeout_s=0.5,
        connect_timeout_s=0.5,
        eject_after_failures=2,
        eject_duration_s=0.5,
    )
    control(stuck, mode="hang")
    api = client(gateway.url)

    raw = api.chat.completions.with_raw_response.create(model="test-model", messages=MESSAGES, stream=True)
    assert raw.headers["x-fleetserve-route"] == "healthy;round_robin"
    assert len(list(raw.parse())) == 5
    assert (
        metric_value(gateway, "fleetserve_gateway_upstream_errors_total", engine="stuck", kind="timeout") == 1
    )

    routable = "fleetserve_engine_routable"
    wait_until(lambda: metric_value(gateway, routable, engine="stuck") == 0, timeout=15, message="ejected")
    for _ in range(3):  # an ejected engine gets no traffic
        routed = api.completions.with_raw_response.create(model="test-model", prompt="x", max_tokens=1)
        assert routed.headers["x-fleetserve-route"].startswith("healthy;")

    control(stuck, mode="ok")
    wait_until(lambda: metric_value(gateway, routable, engine="stuck") == 1, timeout=15, message="recovered")
    routes = {
        api.completions.with_raw_response.create(model="test-model", prompt="x", max_tokens=1).headers[
            "x-fleetserve-route"
        ]
        for _ in range(4)
    }
    assert "stuck;round_robin" in routes


def test_client_disconnect_cancels_the_upstream_request(procs: Processes) -> None:
    slow = procs.upstream("slow", chunk_delay_ms=200)
    gateway = procs.gateway([slow])
    body = {"model": "test-model", "messages": MESSAGES, "stream": True, "max_tokens": 50}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=10) as response:
        first = next(response.iter_bytes())
        assert first.startswith(b"data: ")
        assert _upstream_running(slow) == 1
    wait_until(lambda: _upstream_running(slow) == 0, timeout=10, message="upstream request cancelled")
    wait_until(lambda: metric_value(gateway, "fleetserve_engine_in_flight", engine="slow") == 0)
    assert metric_value(gateway, "fleetserve_gateway_requests_total", status="499") == 1


def _upstream_running(upstream: Process) -> int:
    text = httpx.get(upstream.url + "/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("vllm:num_requests_running"))
    return int(float(line.rsplit(" ", 1)[1]))
