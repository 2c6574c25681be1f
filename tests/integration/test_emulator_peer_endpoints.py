"""The endpoints peer routers call on a vLLM / SGLang worker, served by a real `fleetserve engine emulate`
process: SGLang's server and model info (old and new paths), vLLM's `/reset_prefix_cache` and SGLang's
`/flush_cache`, which must really empty the engine model's prefix cache."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import msgpack
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers import free_port, stop_process_group, wait_until

from fleetserve import __version__

MODEL = "llama-3-8b"
SERVED = "emulated-llama"
MAX_MODEL_LEN = 4096
BLOCK_SIZE = 32
MAX_NUM_SEQS = 64
MAX_NUM_BATCHED_TOKENS = 2048
TP = 2
# about 700 tokens: many full KV blocks, a quick prefill
LONG_PROMPT_REPEATS = 100


@dataclass
class Emulator:
    url: str
    kv_events: str
    process: subprocess.Popen[bytes]


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    port, events_port = free_port(), free_port()
    kv_events = f"tcp://127.0.0.1:{events_port}"
    argv = [
        sys.executable, "-c", "from fleetserve.cli import main; main()", "engine", "emulate",
        "--gpu", "h100-80g", "--model", MODEL, "--served-model-name", SERVED, "--tp", str(TP),
        "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", str(BLOCK_SIZE), "--max-num-seqs", str(MAX_NUM_SEQS),
        "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), "--kv-events-endpoint", kv_events,
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("emulator") / "emulator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is not None or _answers(f"{url}/health"),
            timeout=30,
            message="the emulator to answer /health",
        )
        assert process.poll() is None, log_path.read_text()
        yield Emulator(url, kv_events, process)
    finally:
        stop_process_group(process)


def metrics(url: str) -> dict[str, float]:
    """Sample name -> value of the engine's /metrics (the unlabelled-enough ones this file reads)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return values


def cache_config(url: str) -> dict[str, str]:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        if family.name == "vllm:cache_config_info":
            return dict(family.samples[0].labels)
    raise AssertionError("no vllm:cache_config_info")


def complete(url: str, prompt: str) -> None:
    response = httpx.post(
        f"{url}/v1/completions", json={"model": SERVED, "prompt": prompt, "max_tokens": 1}, timeout=30
    )
    assert response.status_code == 200, response.text


def prefix_hits_of(url: str, prompt: str) -> tuple[float, float]:
    """(prefix-cache hit tokens, looked-up tokens) that one request for `prompt` added."""
    before = metrics(url)
    complete(url, prompt)
    after = metrics(url)
    return (
        after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"],
        after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"],
    )


def long_prompt(tag: str) -> str:
    """A prompt of many full KV blocks whose first block already differs from other tags'."""
    return f"{tag} " + "alpha beta gamma delta " * LONG_PROMPT_REPEATS


@pytest.mark.parametrize("path", ["/get_server_info", "/server_info"])
def test_server_info(emulator: Emulator, path: str) -> None:
    response = httpx.get(f"{emulator.url}{path}", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    info = response.json()
    kv_tokens = int(cache_config(emulator.url)["num_gpu_blocks"]) * BLOCK_SIZE
    assert info["model_path"] == SERVED  # the served name, which routers take the model id from
    assert info["served_model_name"] == SERVED
    assert "tokenizer_path" not in info
    assert info["tp_size"] == TP and info["dp_size"] == 1
    assert info["max_total_num_tokens"] == kv_tokens > 0
    assert info["max_running_requests"] == MAX_NUM_SEQS
    assert info["chunked_prefill_size"] == MAX_NUM_BATCHED_TOKENS
    assert info["page_size"] == BLOCK_SIZE
    assert info["context_length"] == MAX_MODEL_LEN
    assert info["max_req_input_len"] == MAX_MODEL_LEN - 1
    assert info["disable_radix_cache"] is False
    assert info["version"] == __version__
    (state,) = info["internal_states"]
    assert state["memory_usage"]["token_capacity"] == kv_tokens


def test_server_info_paths_agree(emulator: Emulator) -> None:
    old, new = (
        httpx.get(f"{emulator.url}{path}", timeout=5).json() for path in ("/get_server_info", "/server_info")
    )
    assert old == new


@pytest.mark.parametrize("path", ["/get_model_info", "/model_info"])
def test_model_info(emulator: Emulator, path: str) -> None:
    response = httpx.get(f"{emulator.url}{path}", timeout=5)
    assert response.status_code == 200
    info = response.json()
    assert info["model_path"] == SERVED
    assert info["served_model_name"] == SERVED
    assert info["tokenizer_path"] is None  # routers only use a non-empty string
    assert info["is_generation"] is True


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/reset_prefix_cache"), ("POST", "/flush_cache"), ("GET", "/flush_cache")]
)
def test_reset_makes_the_next_identical_request_miss(emulator: Emulator, method: str, path: str) -> None:
    prompt = long_prompt(f"reset{method}{path}")
    complete(emulator.url, prompt)
    hits, queries = prefix_hits_of(emulator.url, prompt)
    assert hits > 0 and queries > 0, "the repeated prompt should hit the prefix cache"

    response = httpx.request(method, f"{emulator.url}{path}", timeout=5)
    assert response.status_code == 200, response.text
    if path == "/reset_prefix_cache":
        assert response.content == b""  # vLLM's empty 200
    else:
        assert response.text.startswith("Cache flushed.")

    hits, queries = prefix_hits_of(emulator.url, prompt)
    assert queries > 0 and hits == 0, "after the reset the same prompt must miss the prefix cache"
    hits, _ = prefix_hits_of(emulator.url, prompt)
    assert hits > 0, "the prompt is cached again after the miss"


def test_reset_refused_while_a_request_runs(emulator: Emulator) -> None:
    url = emulator.url
    prompt = long_prompt("running")
    # at time scale 1 this decodes for several seconds; it is aborted by closing the stream below
    body = {"model": SERVED, "prompt": prompt, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")

        reset = httpx.post(f"{url}/reset_prefix_cache", timeout=5)
        assert reset.status_code == 409
        error = reset.json()["error"]
        assert error["code"] == 409 and error["message"] == "Prefix cache reset failed."

        flush = httpx.post(f"{url}/flush_cache", timeout=5)
        assert flush.status_code == 400
        assert "will not be performed" in flush.text

    wait_until(
        lambda: metrics(url)["vllm:num_requests_running"] == 0,
        timeout=10,
        message="the aborted request to leave the engine",
    )
    # nothing was cleared while the request ran: its prompt is still cached
    hits, _ = prefix_hits_of(url, prompt)
    assert hits > 0
    assert httpx.post(f"{url}/reset_prefix_cache", timeout=5).status_code == 200


def test_reset_publishes_all_blocks_cleared(emulator: Emulator) -> None:
    context = zmq.Context.instance()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.connect(emulator.kv_events)
    try:

        def tags_received() -> list[str]:
            tags = []
            while subscriber.poll(100):
                _topic, _seq, payload = subscriber.recv_multipart()
                _ts, events, _rank = msgpack.unpackb(payload)
                tags.extend(event[0] for event in events)
            return tags

        def stored_seen() -> bool:
            # a SUB socket joins late: keep sending fresh prompts until a batch arrives
            complete(emulator.url, long_prompt(f"events{time.monotonic()}"))
            return "BlockStored" in tags_received()

        wait_until(stored_seen, timeout=15, message="a BlockStored event")
        assert httpx.post(f"{emulator.url}/reset_prefix_cache", timeout=5).status_code == 200
        seen: list[str] = []
        wait_until(
            lambda: seen.extend(tags_received()) or "AllBlocksCleared" in seen,
            timeout=5,
            message="an AllBlocksCleared event after the reset",
        )
    finally:
        subscriber.close()


def test_wrong_methods(emulator: Emulator) -> None:
    assert httpx.get(f"{emulator.url}/reset_prefix_cache", timeout=5).status_code == 405
    assert httpx.post(f"{emulator.url}/server_info", timeout=5).status_code == 405
