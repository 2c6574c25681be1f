"""Streams that survive their engine: real emulated engines (one process each) killed with SIGKILL while
the official openai client reads a stream through `fleetserve serve`."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tests.helpers import wait_until
from tests.integration.gateway_harness import Process, Processes, metric_value, running_processes

MODEL = "llama-3-8b"
MESSAGES = [{"role": "user", "content": "tell me about the sea and the ships on it"}]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


def fleet(procs: Processes, count: int, time_scale: float) -> tuple[dict[str, Process], Process]:
    engines = {f"e{index}": procs.emulated(f"e{index}", time_scale=time_scale) for index in range(count)}
    gateway = procs.gateway(
        [
            {"name": name, "model": MODEL, "url": engine.url, "gpu": "l4", "dialect": "vllm"}
            for name, engine in engines.items()
        ],
        router={"policy": "least_request"},
    )
    return engines, gateway


def client(gateway: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)


def engine_counter(engine: Process, name: str) -> float:
    with urllib.request.urlopen(engine.url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rpartition(" ")[2])
    return 0.0


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_stream_whose_engine_is_killed_goes_on_elsewhere_with_contiguous_text_and_usage(
    procs: Processes, kind: str
) -> None:
    engines, gateway = fleet(procs, 2, time_scale=4)
    api = client(gateway)
    request = {"model": MODEL, "stream": True, "max_tokens": 40, "stream_options": {"include_usage": True}}
    request["extra_body"] = {"ignore_eos": True}
    request["extra_headers"] = {"x-fleetserve-report-resumes": "1"}
    if kind == "chat":
        raw = api.chat.completions.with_raw_response.create(messages=MESSAGES, **request)
    else:
        raw = api.completions.with_raw_response.create(prompt="tell me about the sea", **request)
    served_by = raw.headers["x-fleetserve-route"].split(";")[0]
    survivor = engines[next(name for name in engines if name != served_by)]
    prompt_tokens_before = engine_counter(survivor, "vllm:prompt_tokens_total")
    pieces: list[str] = []
    chunks = []
    for chunk in raw.parse():
        chunks.append(chunk)
        if chunk.choices:
            piece = chunk.choices[0].delta.content if kind == "chat" else chunk.choices[0].text
            pieces.append(piece or "")
        if sum(1 for piece in pieces if piece) == 10 and engines[served_by].popen.poll() is None:
            engines[served_by].kill()
    assert engines[served_by].popen.poll() is not None  # it died mid-stream
    text_pieces = [piece for piece in pieces if piece]
    assert len(text_pieces) == 40  # every token of the answer, one chunk each, nothing lost or repeated
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 40
    assert chunks[-1].model_extra["x_fleetserve"] == {"resumed": 1}
    assert len({chunk.id for chunk in chunks}) == 1 and len({chunk.created for chunk in chunks}) == 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]  # from the engine that finished, once
    # the survivor was asked to continue: the prompt plus the tokens already sent, counted as its prompt
    continued_prompt = engine_counter(survivor, "vllm:prompt_tokens_total") - prompt_tokens_before
    sent_before_kill = continued_prompt - usage.prompt_tokens
    assert 10 <= sent_before_kill < 40
    # the same request on a healthy fleet counts the same prompt, once
    if kind == "chat":
        again = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    else:
        again = api.completions.create(model=MODEL, prompt="tell me about the sea", max_tokens=1)
    assert again.usage is not None and usage.prompt_tokens == again.usage.prompt_tokens
    assert metric_value(gateway, "fleetserve_stream_resumes_total", reason="stream") == 1


def test_a_request_not_streamed_is_retried_whole_when_its_engine_dies(procs: Processes) -> None:
    engines, gateway = fleet(procs, 2, time_scale=4)
    api = client(gateway)
    outcome: dict[str, object] = {}

    import threading

    def ask() -> None:
        outcome["answer"] = api.completions.create(
            model=MODEL, prompt="a long answer please", max_tokens=60, extra_body={"ignore_eos": True}
        )

    asker = threading.Thread(target=ask)
    asker.start()
    busy = wait_until(
        lambda: next(
            (n for n, e in engines.items() if engine_counter(e, "vllm:num_requests_running") >= 1), None
        ),
        timeout=20,
        message="the request running on an engine",
    )
    engines[busy].kill()
    asker.join(timeout=60)
    answer = outcome["answer"]
    assert answer.usage.completion_tokens == 60  # type: ignore[attr-defined]
    assert metric_value(gateway, "fleetserve_gateway_retries_total") == 1
