"""Live migration: `fleetserve serve` runs the migration controller over real emulated engine processes
and carries moved requests' streams from one engine to another while the official openai client reads
them, with the KV copied (the destination computes only the last token again) or recomputed (it
prefills the context, as a real engine without a migration connector would). The load: a burst that
round-robin routing splits evenly over an L4 and an H100, so the L4 queues while the H100 has room,
which is what the drain_time controller moves requests for."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from tests.integration.gateway_harness import Process, Processes, metric_value, running_processes

MODEL = "llama-3-8b"
OUTPUT_TOKENS = 60
REQUESTS = 48


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


GPUS = {"l4": "l4", "h100": "h100-80g"}


def fleet(procs: Processes, migration: dict) -> Process:
    engines = {name: procs.emulated(name, gpu=gpu, time_scale=1) for name, gpu in GPUS.items()}
    lines = [
        {"name": name, "model": MODEL, "url": engines[name].url, "gpu": gpu} for name, gpu in GPUS.items()
    ]
    return procs.gateway(lines, router={"policy": "round_robin"}, fleet_extra={"migration": migration})


def stream_one(api: openai.OpenAI, index: int) -> list[openai.types.Completion]:
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt=f"request {index}: " + "the sea " * 1000,  # 2k tokens: the L4 runs out of KV and queues
            max_tokens=OUTPUT_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    return chunks


@pytest.mark.parametrize("kv", [True, False], ids=["kv-copied", "recomputed"])
def test_requests_move_under_load_and_every_client_stream_stays_whole(procs: Processes, kv: bool) -> None:
    gateway = fleet(procs, {"policy": "drain_time", "interval_s": 0.25, "kv": kv})
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(lambda index: stream_one(api, index), range(REQUESTS)))
    moved = metric_value(gateway, "fleetserve_migrations_total", outcome="moved")
    assert moved is not None and moved > 0
    for chunks in answers:
        pieces = [chunk.choices[0].text for chunk in chunks if chunk.choices and chunk.choices[0].text]
        assert len(pieces) == OUTPUT_TOKENS  # one chunk a token, none lost or repeated across the move
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == OUTPUT_TOKENS
        assert len({chunk.id for chunk in chunks}) == 1
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
    assert not metric_value(gateway, "fleetserve_stream_resumes_total")
