"""The official openai client through `fleetserve serve` to a real engine: the fleet file asks for one
llama.cpp server (SmolLM2-135M, launched by serve itself), and the gateway proxies real tokens, streamed
and not, lists the model, and answers bad requests with OpenAI-shaped errors."""

from __future__ import annotations

import importlib.util
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tests.helpers import free_port, free_ports, wait_until
from tests.integration.gateway_harness import Serve, answers

MODEL = "smollm2-135m"

pytestmark = [
    pytest.mark.llamacpp,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama_cpp is not importable: install the llama.cpp extra, pip install 'fleetserve[llamacpp]'",
    ),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    gateway_port = free_port()
    fleet = {
        "engines": [{"name": "smol", "kind": "llamacpp", "model": MODEL, "port": free_ports(1)}],
        "gateway": {"port": gateway_port, "health_interval_s": 0.2, "scrape_interval_s": 0.2},
    }
    serve = Serve(Path(tmp_path_factory.mktemp("gateway_llamacpp")), fleet)
    try:
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: answers(url + "/ready"), timeout=120, message="gateway ready:\n" + serve.output())
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    finally:
        serve.kill()


def test_chat_through_the_gateway_returns_real_text(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12
    )
    assert answer.choices[0].message.content and answer.choices[0].message.content.strip()
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 12


def test_streamed_completion_arrives_in_several_chunks(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len([piece for piece in pieces if piece]) >= 2
    assert "".join(pieces).strip()


def test_models_lists_the_real_engine(client: openai.OpenAI) -> None:
    # /v1/models lists routable engines only. llama-cpp-python answers no probe while it generates, so
    # on a loaded machine the tests before this one can get the engine ejected for a few seconds.
    wait_until(
        lambda: MODEL in {model.id for model in client.models.list()}, timeout=30, message="engine listed"
    )


def test_bad_requests_get_openai_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert "no-such-model" in unknown.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=-1
        )


def _engine_pid(serve: Serve, port: int) -> int:
    for pid in serve.descendants():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(port).encode() in argv and any(b"llama_cpp" in arg for arg in argv):
            return pid
    raise AssertionError(f"no llama.cpp process on port {port}")


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_a_greedy_stream_resumed_on_another_llamacpp_engine_is_the_answer_it_would_have_been(
    tmp_path: Path, kind: str
) -> None:
    """Two llama.cpp engines, one killed with SIGKILL after 8 tokens: the second continues from the
    text so far (a chat through the model's own template). At temperature 0 the continuation picks up
    where the first engine stopped: its first word is the unbroken answer's next word. (It may drift
    later: the text so far is a batched prefill on the second engine, token-by-token decode on the
    first, and their float sums differ enough to flip a near-tie.)"""
    gateway_port = free_port()
    base_port = free_ports(2)  # the first of two free consecutive ports
    fleet = {
        "engines": [{"name": "smol", "kind": "llamacpp", "model": MODEL, "replicas": 2, "port": base_port}],
        "gateway": {"port": gateway_port, "health_interval_s": 0.5, "scrape_interval_s": 0.5},
        "router": {"policy": "round_robin", "debug_header": True},
    }
    serve = Serve(tmp_path, fleet)
    try:
        url = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: answers(url + "/ready"), timeout=120, message="gateway ready:\n" + serve.output())
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        request = {"model": MODEL, "max_tokens": 32, "temperature": 0.0, "stream": True}
        messages = [{"role": "user", "content": "Write two sentences about the sea."}]

        def stream() -> openai.Stream:
            if kind == "chat":
                return api.chat.completions.with_raw_response.create(messages=messages, **request)
            return api.completions.with_raw_response.create(prompt="The sea is", **request)

        def text_of(chunk: object) -> str:
            choice = chunk.choices[0]  # type: ignore[attr-defined]
            return (choice.delta.content if kind == "chat" else choice.text) or ""

        unbroken = "".join(text_of(chunk) for chunk in stream().parse() if chunk.choices)
        raw = stream()
        engine_id = raw.headers["x-fleetserve-route"].split(";")[0]
        doomed = _engine_pid(serve, base_port + int(engine_id.rsplit("-", 1)[1]))
        pieces: list[str] = []
        for chunk in raw.parse():
            if chunk.choices and text_of(chunk):
                pieces.append(text_of(chunk))
            if len(pieces) == 8 and Path(f"/proc/{doomed}").exists():
                os.kill(doomed, signal.SIGKILL)
        resumed = "".join(pieces)
        before = "".join(pieces[:8])
        assert len(pieces) > 8, resumed  # it went on after the kill
        assert unbroken.startswith(before)
        after = resumed[len(before) :]
        # not a fresh start of the answer (which a continuation without the text so far would be) ...
        assert not after.lstrip().startswith(unbroken.lstrip()[:12]), (unbroken, resumed)
        # ... but its next word
        assert after.split()[:1] == unbroken[len(before) :].split()[:1], (unbroken, resumed)
        assert "resumed on smol-" in serve.output()
    finally:
        serve.kill()
