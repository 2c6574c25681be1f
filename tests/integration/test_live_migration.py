"""Live migration: `fleetserve serve` runs the migration controller over real emulated engine processes
and carries moved requests' streams from one engine to another while the official openai client reads
them, with the KV copied (the destination computes only the last token again) or recomputed (it
prefills the context, as a real engine without a migration connector would). The load: a burst that
round-robin routing splits evenly over an L4 and an H100, so the L4 queues while the H100 has room,
which is what the drain_time controller moves requests for."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tests.helpers import free_port, free_ports, wait_until
from tests.integration.gateway_harness import (
    Process,
    Processes,
    Serve,
    answers,
    get_json,
    metric_value,
    post_json,
    running_processes,
)

MODEL = "llama-3-8b"
OUTPUT_TOKENS = 60
REQUESTS = 48


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


GPUS = {"l4": "l4", "h100": "h100-80g"}


def fleet(procs: Processes, migration: dict, **gateway: object) -> Process:
    engines = {name: procs.emulated(name, gpu=gpu, time_scale=1) for name, gpu in GPUS.items()}
    lines = [
        {"name": name, "model": MODEL, "url": engines[name].url, "gpu": gpu} for name, gpu in GPUS.items()
    ]
    return procs.gateway(
        lines, router={"policy": "round_robin"}, fleet_extra={"migration": migration}, **gateway
    )


def stream_one(
    api: openai.OpenAI,
    index: int,
    output_tokens: int = OUTPUT_TOKENS,
    started: threading.Barrier | None = None,
) -> list[openai.types.Completion]:
    chunks = []
    for chunk in api.completions.create(
        model=MODEL,
        prompt=f"request {index}: " + "the sea " * 1000,  # 2k tokens: the L4 runs out of KV and queues
        max_tokens=output_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        chunks.append(chunk)
        if started is not None and len(chunks) == 1:
            started.wait()
    return chunks


def assert_whole(chunks: list[openai.types.Completion], output_tokens: int) -> None:
    pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices and chunk.choices[0].text]
    assert len(pieces) == output_tokens  # one chunk a token, none lost or repeated across the move
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == output_tokens
    assert len({chunk.id for chunk in chunks}) == 1
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]


@pytest.mark.parametrize("kv", [True, False], ids=["kv-copied", "recomputed"])
def test_requests_move_under_load_and_every_client_stream_stays_whole(procs: Processes, kv: bool) -> None:
    gateway = fleet(procs, {"policy": "drain_time", "interval_s": 0.25, "kv": kv})
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(lambda index: stream_one(api, index), range(REQUESTS)))
    moved = metric_value(gateway, "fleetserve_migrations_total", outcome="moved")
    assert moved is not None and moved > 0
    for chunks in answers:
        assert_whole(chunks, OUTPUT_TOKENS)
    assert not metric_value(gateway, "fleetserve_stream_resumes_total")


def test_draining_an_engine_moves_its_running_requests_out(tmp_path: Path) -> None:
    """Scale-in through the admin API on a fleet `serve` launched: the drained engine's requests move out
    (reason drain) and it leaves the fleet long before they would have finished on it."""
    gateway_port, admin_port = free_port(), free_port()
    fleet_file = {
        "engines": [{"name": name, "gpu": gpu, "model": MODEL} for name, gpu in GPUS.items()],
        "emulator": {"base_port": free_ports(2)},
        "gateway": {"port": gateway_port, "admin_port": admin_port, "health_interval_s": 0.2},
        "router": {"policy": "round_robin"},
        "migration": {"policy": "drain_time", "interval_s": 0.25},
    }
    serve = Serve(tmp_path, fleet_file)
    url, admin = f"http://127.0.0.1:{gateway_port}", f"http://127.0.0.1:{admin_port}"
    try:
        wait_until(lambda: answers(url + "/ready"), timeout=60, message="gateway ready:\n" + serve.output())
        api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        streams, long_answer = 6, 1500  # at the L4's pace, more than 40 s left when the drain starts
        started = threading.Barrier(streams + 1)
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            running = [pool.submit(stream_one, api, index, long_answer, started) for index in range(streams)]
            started.wait(timeout=60)  # every stream has its first token, half of them on the L4
            post_json(f"{admin}/engines/l4/drain", {})
            # the L4 leaves the fleet once its requests have moved, long before they would finish there
            wait_until(
                lambda: "l4" not in {engine["id"] for engine in get_json(f"{admin}/engines")["engines"]},
                timeout=20,
                message="l4 drained",
            )
            results = [future.result() for future in running]
        for chunks in results:
            assert_whole(chunks, long_answer)
        gateway = Process(serve.popen, url, "gateway")
        assert (
            metric_value(gateway, "fleetserve_migrations_total", reason="drain", outcome="moved")
            == streams // 2
        )
    finally:
        serve.kill()
