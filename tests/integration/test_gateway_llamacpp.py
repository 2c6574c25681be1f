"""The official openai client through `fleetserve serve` to a real engine: the fleet file asks for one
llama.cpp server (SmolLM2-135M, launched by serve itself), and the gateway proxies real tokens, streamed
and not, lists the model, and answers bad requests with OpenAI-shaped errors."""

from __future__ import annotations

import importlib.util
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
