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
from tests.integration.gateway_harness import (
    Process,
    Processes,
    control,
    get_json,
    metric_value,
    running_processes,
)

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


def test_engine_killed_mid_stream_is_resumed_on_another_engine(procs: Processes) -> None:
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
    chunks = list(doomed_stream)
    other.join(timeout=30)
    # whole events only: the half-written third never reaches the client; the steady engine goes on
    # for the 6 tokens left, and its chunks carry the first stream's id
    texts = [c.choices[0].delta.content for c in chunks]
    assert texts == ["t0 ", "t1 ", "t0 ", "t1 ", "t2 ", "t3 ", "t4 ", "t5 "]
    assert {c.id for c in chunks} == {"dying-stream"}
    assert steady_text == ["t0 t1 t2 t3 t4 t5 t6 t7 "]
    continued = get_json(steady.url + "/control")["last_body"]  # it came after the steady stream's
    assert continued["messages"][-1] == {"role": "assistant", "content": "t0 t1 "}
    assert continued["continue_final_message"] is True and continued["add_generation_prompt"] is False
    assert continued["max_tokens"] == 6
    resumes = metric_value(gateway, "fleetserve_stream_resumes_total", reason="stream")
    assert resumes == 1
    assert metric_value(gateway, "fleetserve_gateway_requests_total", status="502") is None


def test_a_stream_that_cannot_be_resumed_ends_with_one_error_event(procs: Processes) -> None:
    raw_engine = procs.upstream("raw", chunk_delay_ms=1)
    spare = procs.upstream("spare", chunk_delay_ms=1)
    body = {"model": "test-model", "messages": MESSAGES, "stream": True, "max_tokens": 5}

    def events(gateway: Process, payload: dict) -> list[str]:
        control(raw_engine, mode="die_mid_stream", die_after=1)
        text = httpx.post(gateway.url + "/v1/chat/completions", json=payload, timeout=10).text
        return [event for event in text.split("\n\n") if event]

    # the raw stream ends with one error event and then a clean [DONE]: resuming switched off ...
    no_resumes = procs.gateway([raw_engine], max_resumes=0)
    found = events(no_resumes, body)
    assert found[-1] == "data: [DONE]"
    assert found[-2].startswith('data: {"error":') and '"code":502' in found[-2]
    assert len(found) == 3
    # ... or a request whose continuation would not be faithful: a seed the client set
    raw_engine = procs.upstream("raw", chunk_delay_ms=1)
    seeded = procs.gateway([{"name": "raw", "model": "test-model", "url": raw_engine.url}], max_resumes=2)
    found = events(seeded, {**body, "seed": 7})
    assert found[-2].startswith('data: {"error":') and len(found) == 3
    del spare


def test_resumes_are_bounded_by_max_resumes(procs: Processes) -> None:
    engines = [procs.upstream(f"dying{index}", chunk_delay_ms=1) for index in range(3)]
    for engine in engines:
        control(engine, mode="die_mid_stream", die_after=1)
    gateway = procs.gateway(engines, router={"policy": "round_robin"}, max_resumes=1)
    body = {"model": "test-model", "prompt": "hello", "stream": True, "max_tokens": 6}
    text = httpx.post(gateway.url + "/v1/completions", json=body, timeout=10).text
    found = [event for event in text.split("\n\n") if event]
    # one chunk from the first engine, one from the engine it resumed on, then the error: no third
    assert [event for event in found if '"text"' in event] and len(found) == 4
    assert found[-2].startswith('data: {"error":') and found[-1] == "data: [DONE]"
    assert metric_value(gateway, "fleetserve_stream_resumes_total") == 1
    survivors = [engine for engine in engines if engine.popen.poll() is None]
    assert len(survivors) == 1  # the third engine was never asked


def test_a_stalled_stream_is_resumed_after_the_stall_timeout(procs: Processes) -> None:
    stalling = procs.upstream("stalling", chunk_delay_ms=1)
    steady = procs.upstream("steady", chunk_delay_ms=1)
    gateway = procs.gateway([stalling, steady], router={"policy": "round_robin"}, stream_stall_timeout_s=0.5)
    control(stalling, mode="stall_mid_stream", die_after=2)
    body = {"model": "test-model", "prompt": "hello", "stream": True, "max_tokens": 5}
    request = {"headers": {"x-fleetserve-report-resumes": "1"}, "timeout": 10}
    texts = []
    for _ in range(2):  # round robin: one of the two lands on the stalling engine
        found = httpx.post(gateway.url + "/v1/completions", json=body, **request).text
        texts.append(found)
    stalled = [text for text in texts if "stalling-stream" in text]
    assert stalled
    for text in stalled:
        assert text.count('"x_fleetserve":{"resumed":1}') == 1 and text.endswith("data: [DONE]\n\n")
        assert "steady-stream" not in text  # the continuation speaks under the first stream's id
    for text in texts:
        if text not in stalled:
            assert '"x_fleetserve":{"resumed":0}' in text  # asked for, so reported even when nothing moved
    assert metric_value(gateway, "fleetserve_stream_resumes_total", reason="stall") == len(stalled)


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
