"""`fleetserve bench`, the real console script, against real engines: an emulated engine process (exact
output lengths, prefix sharing from a trace's hash_ids, latencies the engine model can account for) and
a real llama.cpp server (real tokens, counted from the stream's usage)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from tests.helpers import free_port, pid_alive, stop_process_group, wait_until

from fleetserve.model.catalog import default_catalog
from fleetserve.model.cost import CostModel
from fleetserve.workload.prompts import prompt_text
from fleetserve.workload.trace import TraceRequest, write_jsonl

FLEETSERVE = str(Path(sys.executable).with_name("fleetserve"))
GPU, MODEL = "h100-80g", "llama-3-8b"
# Engine durations x2: small enough to keep the test short, large enough that the event loop's own
# costs stay well below the model's iteration times.
TIME_SCALE = 2.0
CONCURRENCY = 4
BLOCK = 64  # tokens per trace hash block


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode() if response.status == 200 else None
    except OSError:
        return None


def _metric(text: str, name: str) -> float:
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.split("{")[0].split(" ")[0] == name
    )


@pytest.fixture(scope="module")
def emulated_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    argv = [FLEETSERVE, "engine", "emulate", "--gpu", GPU, "--model", MODEL, "--port", str(port)]
    argv += ["--time-scale", str(TIME_SCALE)]
    log = tmp_path_factory.mktemp("emulator") / "engine.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is not None or _get(url + "/health") is not None,
            timeout=30,
            message="emulated engine answers /health",
        )
        assert process.poll() is None, log.read_text()
        yield url
    finally:
        stop_process_group(process)
    assert not pid_alive(process.pid)


def _trace() -> list[TraceRequest]:
    """Eight requests: two families that share their first 4 blocks, then a unique tail; 20-41 tokens out."""
    requests = []
    for index in range(8):
        family = (100, 101, 102, 103) if index % 2 else (200, 201, 202, 203)
        requests.append(
            TraceRequest(
                timestamp_ms=10.0 * index,
                input_length=4 * BLOCK + 32 + 16 * index,
                output_length=20 + 3 * index,
                hash_ids=family,
                hash_block_size=BLOCK,
            )
        )
    return requests


def _bench(url: str, model: str, out: Path, *args: str) -> dict[str, Any]:
    argv = [FLEETSERVE, "bench", "--url", url, "--model", model, "--json", str(out), "--quiet", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_bench_replays_a_trace_against_an_emulated_engine(emulated_engine: str, tmp_path: Path) -> None:
    trace = _trace()
    write_jsonl(trace, tmp_path / "trace.jsonl")
    hits_before = _metric(_get(emulated_engine + "/metrics") or "", "vllm:prefix_cache_hits_total")

    report = _bench(
        emulated_engine,
        MODEL,
        tmp_path / "out.json",
        "--trace",
        str(tmp_path / "trace.jsonl"),
        "--concurrency",
        str(CONCURRENCY),
    )

    summary, rows = report["summary"], report["requests"]
    assert summary["sent"] == summary["completed"] == len(trace)
    assert summary["failed"] == 0 and summary["failures"] == {}
    assert [row["index"] for row in rows] == list(range(len(trace)))
    for row, request in zip(rows, trace, strict=True):
        assert row["ok"], row
        # ignore_eos: the engine generates exactly what the trace asks for
        assert row["requested_output_tokens"] == row["output_tokens"] == request.output_length
    assert summary["total_output_tokens"] == sum(request.output_length for request in trace)

    # the trace's shared hash_ids became shared prompt prefixes the engine's cache reused
    hits_after = _metric(_get(emulated_engine + "/metrics") or "", "vllm:prefix_cache_hits_total")
    assert hits_after - hits_before >= 2 * 4 * BLOCK * 0.9  # later requests of each family hit >= ~4 blocks

    # Latencies against the engine model, stretched by the time scale. The emulator can never be faster
    # than its model (it waits for each iteration's predicted end), so the lower bounds are tight; the
    # upper bounds only catch gross errors (wrong scale, stuck engine), with room for CPU noise.
    catalog = default_catalog()
    cost = CostModel(catalog.gpu(GPU), catalog.model(MODEL))
    fastest_step = TIME_SCALE * cost.decode_step_time(1, batch=1)
    busiest_step = TIME_SCALE * cost.iteration_time(
        [(max(r.input_length for r in trace) * 2, 0)], [1024] * CONCURRENCY
    )
    # A late first token (CPU noise) shortens the measured decode span, hence the 0.8: each answer has
    # at least 19 decode steps, so it takes some 100 ms of lateness to get there.
    tpot_median = summary["tpot_ms"]["median"] / 1000.0
    assert 0.8 * fastest_step <= tpot_median <= 4 * busiest_step + 0.05, (tpot_median, fastest_step)
    # The first requests arrive together on an empty cache: each waits at least for its own prefill.
    first = rows[0]
    assert first["ttft"] >= 0.95 * TIME_SCALE * cost.prefill_time(trace[0].input_length), first
    whole_batch_prefill = TIME_SCALE * cost.prefill_time(2 * trace[-1].input_length, batch=CONCURRENCY)
    assert summary["ttft_ms"]["median"] / 1000.0 <= 4 * whole_batch_prefill + 0.5


@pytest.mark.llamacpp
@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama_cpp is not importable: install the llama.cpp extra, pip install 'fleetserve[llamacpp]'",
)
def test_bench_against_a_real_llamacpp_engine(tmp_path: Path) -> None:
    from fleetserve.engines.commands import llamacpp_replicas
    from fleetserve.engines.launcher import EngineLauncher
    from fleetserve.engines.smollm2 import SMOLLM2_ALIAS, smollm2_gguf_path

    trace = [TraceRequest(10.0 * index, 20 + 4 * index, 6 + 2 * index) for index in range(4)]
    write_jsonl(trace, tmp_path / "trace.jsonl")
    specs = llamacpp_replicas(1, free_port(), alias=SMOLLM2_ALIAS, model_path=smollm2_gguf_path(), n_ctx=512)
    with EngineLauncher(specs, ready_timeout=120) as launcher:
        engine = launcher.engines[0]
        report = _bench(
            engine.url,
            SMOLLM2_ALIAS,
            tmp_path / "llamacpp.json",
            "--trace",
            str(tmp_path / "trace.jsonl"),
            "--concurrency",
            "2",
        )
        # llama-cpp-python sends no usage chunk in streams, so the bench counted the streamed tokens; the
        # same prompts answered whole (greedy, so the same tokens) carry the server's own usage counts.
        client = OpenAI(base_url=engine.url + "/v1", api_key="unused", timeout=60, max_retries=0)
        usages = [
            client.completions.create(
                model=SMOLLM2_ALIAS,
                prompt=prompt_text(request, index=index, seed=0),
                max_tokens=request.output_length,
                temperature=0,
                extra_body={"ignore_eos": True},
            ).usage
            for index, request in enumerate(trace)
        ]
    assert not pid_alive(engine.pid)

    summary, rows = report["summary"], report["requests"]
    assert summary["sent"] == summary["completed"] == len(trace), summary["failures"]
    for row, request, usage in zip(rows, trace, usages, strict=True):
        assert row["ok"], row
        assert usage is not None
        # the bench's prompt text is one real token per trace token
        assert usage.prompt_tokens == request.input_length
        assert 0 < row["output_tokens"] == usage.completion_tokens <= request.output_length
        assert 0 < row["ttft"] <= row["e2e"]
    assert summary["total_output_tokens"] == sum(row["output_tokens"] for row in rows)
