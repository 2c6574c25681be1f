"""The emulated engine as a client sees it: a real `fleetserve engine emulate` process on loopback ports,
spoken to with the official openai client, httpx, prometheus_client's parser and ZMQ."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue

import httpx
import msgpack
import openai
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

READY = re.compile(
    r"fleetserve emulated engine ready: id=(\S+) .*url=(\S+)(?: kv_events=(\S+) kv_replay=(\S+))?"
)
MAX_MODEL_LEN = 2048
# 20x faster than the model predicts: requests finish quickly, yet a long one still runs for seconds
TIME_SCALE = 0.05


@dataclass
class Engine:
    engine_id: str
    url: str
    kv_events: str | None
    kv_replay: str | None


class EmulatorProcess:
    """`fleetserve engine emulate ...` in its own process group, killed with its children at the end."""

    def __init__(self, args: list[str], expected_engines: int = 1, timeout_s: float = 30.0) -> None:
        command = [
            sys.executable,
            "-c",
            "from fleetserve.cli import main; main()",
            "engine",
            "emulate",
            *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.lines: Queue[str] = Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        self.engines: list[Engine] = []
        deadline = time.monotonic() + timeout_s
        while len(self.engines) < expected_engines:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.process.poll() is not None and self.lines.empty()):
                self.stop()
                raise RuntimeError("emulator did not become ready:\n" + "".join(self.output))
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except Empty:
                continue
            match = READY.search(line)
            if match:
                self.engines.append(Engine(*match.groups()))

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                return self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def wait_for(condition: Callable[[], object], timeout_s: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def metrics(url: str) -> dict[str, float]:
    """Sample name -> value of an engine's /metrics; request_success is keyed by its finished_reason."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reason = sample.labels.get("finished_reason")
            values[f"{sample.name}:{reason}" if reason else sample.name] = sample.value
    return values


@pytest.fixture(scope="module")
def emulator() -> Iterator[Engine]:
    process = EmulatorProcess(
        [
            "--gpu", "h100-80g", "--model", "llama-3-8b", "--port", "0",
            "--time-scale", str(TIME_SCALE), "--max-model-len", str(MAX_MODEL_LEN),
            "--kv-events-endpoint", "tcp://127.0.0.1:*", "--kv-events-replay-endpoint", "tcp://127.0.0.1:*",
            "--lora-modules", "static-lora=/adapters/static",
        ]
    )  # fmt: skip
    yield process.engines[0]
    assert process.stop() == 0, "".join(process.output)


@pytest.fixture
def client(emulator: Engine) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{emulator.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def real_time_emulator() -> Iterator[Engine]:
    """time scale 1: a long request runs long enough to be sure only an abort can end it early."""
    process = EmulatorProcess(["--gpu", "h100-80g", "--model", "llama-3-8b", "--port", "0"])
    yield process.engines[0]
    assert process.stop() == 0, "".join(process.output)


def test_completion_not_streamed(client: openai.OpenAI) -> None:
    response = client.completions.create(
        model="llama-3-8b", prompt="The capital of France is", max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert response.object == "text_completion"
    assert response.id.startswith("cmpl-")
    assert response.choices[0].finish_reason == "length"
    assert len(response.choices[0].text.split()) == 7
    assert response.usage is not None
    assert response.usage.completion_tokens == 7
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens + 7


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="llama-3-8b",
        messages=[{"role": "user", "content": "Say something"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(content) == 12  # one chunk per token
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    assert all(chunk.id == chunks[0].id and chunk.object == "chat.completion.chunk" for chunk in chunks)


def test_chat_not_streamed_natural_length(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="llama-3-8b", messages=[{"role": "user", "content": "hello"}], max_tokens=1000
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert response.usage is not None
    generated = response.usage.completion_tokens
    assert 1 <= generated <= 1000
    assert choice.finish_reason == ("length" if generated == 1000 else "stop")
    assert len(choice.message.content.split()) == generated


def test_completion_streamed_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="llama-3-8b",
            prompt=[1000, 2000, 3000],
            max_tokens=5,
            stream=True,
            extra_body={"min_tokens": 5},
        )
    )
    assert "".join(chunk.choices[0].text for chunk in chunks).count(" ") == 5
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in chunks)


def test_errors_are_openai_shaped(emulator: Engine, client: openai.OpenAI) -> None:
    bad_json = httpx.post(
        f"{emulator.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == {"message", "type", "param", "code"}

    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="llama-3-8b", prompt="x", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens"):
        client.completions.create(model="llama-3-8b", prompt="word " * 3000, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="too large"):
        client.completions.create(model="llama-3-8b", prompt="word " * 10, max_tokens=MAX_MODEL_LEN)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model="llama-3-8b", prompt="x", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="llama-3-8b", prompt="x", max_tokens=2, temperature=5)
    missing = httpx.get(f"{emulator.url}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404


def test_lora_load_request_unload(emulator: Engine, client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list().data]
    assert ids == ["llama-3-8b", "static-lora"]

    loaded = httpx.post(
        f"{emulator.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql"}
    )
    assert loaded.status_code == 200 and "added successfully" in loaded.text
    again = httpx.post(
        f"{emulator.url}/v1/load_lora_adapter", json={"lora_name": "sql", "lora_path": "/a/sql"}
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]

    cards = {card["id"]: card for card in httpx.get(f"{emulator.url}/v1/models").json()["data"]}
    assert cards["sql"]["parent"] == "llama-3-8b" and cards["sql"]["root"] == "/a/sql"

    response = client.completions.create(
        model="sql", prompt="SELECT", max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert response.model == "sql" and response.usage is not None and response.usage.completion_tokens == 3

    unloaded = httpx.post(f"{emulator.url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert unloaded.status_code == 200
    gone = httpx.post(f"{emulator.url}/v1/unload_lora_adapter", json={"lora_name": "sql"})
    assert gone.status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql", prompt="SELECT", max_tokens=3)


def test_tokenize_probes_and_version(emulator: Engine) -> None:
    tokenized = httpx.post(
        f"{emulator.url}/tokenize", json={"model": "llama-3-8b", "prompt": "hello there"}
    ).json()
    assert tokenized["count"] == len(tokenized["tokens"]) > 0
    assert tokenized["max_model_len"] == MAX_MODEL_LEN
    longer = httpx.post(f"{emulator.url}/tokenize", json={"prompt": "hello there, friend"}).json()
    assert longer["tokens"][: tokenized["count"]] == tokenized["tokens"]  # prefix-stable
    assert httpx.get(f"{emulator.url}/health").status_code == 200
    assert httpx.get(f"{emulator.url}/ping").status_code == 200
    assert "version" in httpx.get(f"{emulator.url}/version").json()


def test_metrics_move_while_requests_run(emulator: Engine, client: openai.OpenAI) -> None:
    before = metrics(emulator.url)
    assert before["vllm:num_requests_running"] == 0
    results: list[int] = []

    def run() -> None:
        response = client.completions.create(
            model="llama-3-8b",
            prompt="tell a long story " * 20,
            max_tokens=800,
            extra_body={"ignore_eos": True},
        )
        assert response.usage is not None
        results.append(response.usage.completion_tokens)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    busy = wait_for(
        lambda: (m := metrics(emulator.url))["vllm:num_requests_running"] > 0 and m, what="running requests"
    )
    assert isinstance(busy, dict) and busy["vllm:kv_cache_usage_perc"] > 0
    for thread in threads:
        thread.join(timeout=30)
    assert results == [800] * 4
    after = metrics(emulator.url)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:generation_tokens_total"] >= before["vllm:generation_tokens_total"] + 3200
    assert (
        after["vllm:time_to_first_token_seconds_count"]
        >= before["vllm:time_to_first_token_seconds_count"] + 4
    )
    assert after["vllm:prefix_cache_hits_total"] > before["vllm:prefix_cache_hits_total"]  # same prompt x4
    assert "vllm:lora_requests_info" in after and "vllm:cache_config_info" in after


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_blocks(real_time_emulator: Engine, stream: bool) -> None:
    url = real_time_emulator.url
    aborted_before = metrics(url).get("vllm:request_success_total:abort", 0)
    # about 14 s of decoding on the modelled H100: far longer than the waits below
    body = {"prompt": "a long answer please " * 20, "max_tokens": 2000, "ignore_eos": True, "stream": stream}
    with httpx.Client(timeout=30) as http:
        if stream:
            with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                lines = response.iter_lines()  # dropping the iterator would close the connection early
                assert next(lines).startswith("data: ")
                assert metrics(url)["vllm:kv_cache_usage_perc"] > 0
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    wait_for(
        lambda: (m := metrics(url))["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0,
        timeout_s=5,
        what="the aborted request to release its KV blocks",
    )
    after = metrics(url)
    assert after["vllm:request_success_total:abort"] == aborted_before + 1
    assert after["vllm:generation_tokens_total"] < 2000


def test_kv_events_published_and_replayed(emulator: Engine, client: openai.OpenAI) -> None:
    assert emulator.kv_events and emulator.kv_replay
    context = zmq.Context.instance()
    subscriber = context.socket(zmq.SUB)
    subscriber.setsockopt(zmq.SUBSCRIBE, b"")
    subscriber.setsockopt(zmq.LINGER, 0)
    subscriber.connect(emulator.kv_events)
    replay = context.socket(zmq.DEALER)
    replay.setsockopt(zmq.LINGER, 0)
    replay.connect(emulator.kv_replay)
    try:
        stored: list[list[object]] = []
        seqs: list[int] = []

        def receive_block_stored() -> bool:
            # a SUB socket joins late, so keep sending fresh prompts until a batch arrives
            client.completions.create(
                model="llama-3-8b", prompt=f"kv event probe {time.monotonic()} " * 8, max_tokens=2
            )
            while subscriber.poll(100):
                _topic, seq, payload = subscriber.recv_multipart()
                seqs.append(int.from_bytes(seq, "big"))
                ts, events, rank = msgpack.unpackb(payload)
                assert isinstance(ts, float) and rank == 0
                stored.extend(event for event in events if event[0] == "BlockStored")
            return bool(stored)

        wait_for(receive_block_stored, what="a BlockStored event")
        tag, hashes, parent, token_ids, block_size, lora_id, medium, lora_name = stored[0]
        assert tag == "BlockStored" and parent is None and lora_id is None and lora_name is None
        assert block_size == 16 and len(token_ids) == 16 * len(hashes) and medium == "GPU"
        assert seqs == sorted(seqs)

        replay.send_multipart([b"", seqs[0].to_bytes(8, "big")])
        replayed: list[int] = []
        while True:
            assert replay.poll(5000), "no replay answer"
            _, seq, payload = replay.recv_multipart()
            number = int.from_bytes(seq, "big", signed=True)
            if number == -1:
                assert payload == b""
                break
            assert msgpack.unpackb(payload)[2] == 0
            replayed.append(number)
        assert replayed[: len(seqs)] == seqs
    finally:
        subscriber.close()
        replay.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_fleet_file_starts_every_emulated_engine(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        f"""
engines:
  - {{name: h100, gpu: h100-80g, model: llama-3-8b, port: {ports[0]}, time_scale: {TIME_SCALE}}}
  - {{name: a100, gpu: a100-80g, model: llama-3-8b, port: {ports[1]}, time_scale: {TIME_SCALE}}}
  - {{name: l4, gpu: l4, model: qwen2.5-7b, port: {ports[2]}, time_scale: {TIME_SCALE},
     adapters: [chat-lora]}}
  - {{name: remote, model: llama-3-8b, url: "http://127.0.0.1:9"}}
"""
    )
    process = EmulatorProcess(["--fleet", str(fleet)], expected_engines=3)
    try:
        assert [engine.engine_id for engine in process.engines] == ["h100", "a100", "l4"]
        assert [engine.url for engine in process.engines] == [f"http://127.0.0.1:{port}" for port in ports]
        for engine in process.engines:
            client = openai.OpenAI(base_url=f"{engine.url}/v1", api_key="unused", max_retries=0)
            model = client.models.list().data[0].id
            response = client.completions.create(model=model, prompt="hi", max_tokens=2)
            assert response.model == model
        l4_models = [
            card.id
            for card in openai.OpenAI(base_url=f"{process.engines[2].url}/v1", api_key="x").models.list()
        ]
        assert l4_models == ["qwen2.5-7b", "chat-lora"]
    finally:
        assert process.stop(signal.SIGINT) == 0, "".join(process.output)


def test_export_hands_a_running_request_over_and_import_goes_on_with_it(real_time_emulator: Engine) -> None:
    url = real_time_emulator.url
    body = {"prompt": "a long answer please " * 20, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream(
            "POST", f"{url}/v1/completions", json=body, headers={"x-request-id": "mig-1"}
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            load = http.get(f"{url}/fleetserve/load").json()
            assert [row[0] for row in load["decoding"]] == ["mig-1"]
            exported = http.post(f"{url}/fleetserve/export", json={"request_id": "mig-1"})
            assert exported.status_code == 200, exported.text
            state = exported.json()
            events = ["first", *(line for line in lines if line.startswith("data: "))]
        # the stream sent every token made here, then ended without [DONE]
        assert "data: [DONE]" not in events and len(events) == state["output_tokens"]
        assert state["output_left"] == 2000 - state["output_tokens"] and state["finish_reason"] == "length"
        assert http.post(f"{url}/fleetserve/export", json={"request_id": "mig-1"}).status_code == 404
        after = http.get(f"{url}/fleetserve/load").json()
        assert after["decoding"] == [] and after["free_blocks"] == after["total_blocks"]  # no block kept

        imported = {"output_left": 5, "finish_reason": "stop", "kv": True}
        header = {"x-fleetserve-import": json.dumps(imported), "x-request-id": "mig-1"}
        going_on = http.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=header)
        assert going_on.status_code == 200, going_on.text
        answer = going_on.json()
        assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["finish_reason"] == "stop"

        bad = http.post(f"{url}/v1/completions", json=body, headers={"x-fleetserve-import": "{"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "x-fleetserve-import"
        unknown = http.post(f"{url}/fleetserve/export", json={"request_id": "nobody"})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "NotFoundError"
        assert http.post(f"{url}/fleetserve/export", json={"request_id": 7}).status_code == 400
