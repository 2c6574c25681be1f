"""The gateway in front of real emulated engines (`fleetserve engine emulate`) of two GPU types, and
engines added and removed at run time through the admin API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from tests.helpers import free_port, wait_until
from tests.integration.gateway_harness import Process, Processes, answers, metric_value, running_processes

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MESSAGES = [{"role": "user", "content": "Tell me about heterogeneous GPU fleets."}]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    yield from running_processes(tmp_path)


def emulated(procs: Processes, name: str, gpu: str) -> tuple[Process, dict[str, object]]:
    port = free_port()
    argv = [str(FLEETSERVE), "engine", "emulate", "--gpu", gpu, "--model", "llama-3-8b"]
    argv += ["--port", str(port), "--time-scale", "0.05"]
    process = procs._spawn(argv, f"http://127.0.0.1:{port}", name)
    wait_until(lambda: answers(process.url + "/v1/models"), timeout=60, message=f"{name} up")
    entry = {"name": name, "model": "llama-3-8b", "gpu": gpu, "url": process.url, "dialect": "vllm"}
    return process, entry


def test_heterogeneous_emulated_fleet_and_run_time_membership(procs: Processes) -> None:
    h100, h100_entry = emulated(procs, "h100", "h100-80g")
    l4, l4_entry = emulated(procs, "l4", "l4")
    admin_port = free_port()
    gateway = procs.gateway([h100_entry], admin_port=admin_port)
    admin = f"http://127.0.0.1:{admin_port}"
    api = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)

    answer = api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=8)
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    chunks = list(
        api.chat.completions.create(model="llama-3-8b", messages=MESSAGES, max_tokens=6, stream=True)
    )
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 6
    wait_until(lambda: metric_value(gateway, "fleetserve_engine_kv_usage", engine="h100") is not None)

    added = httpx.post(
        admin + "/engines", json={"id": "l4", "url": l4.url, "model": "llama-3-8b", "gpu": "l4"}
    )
    assert added.status_code == 201
    assert httpx.post(admin + "/engines", json={"id": "l4", "url": l4.url, "model": "x"}).status_code == 409
    assert httpx.post(admin + "/engines", json={"id": "bad"}).status_code == 400

    def states() -> dict[str, dict[str, object]]:
        return {e["id"]: e for e in httpx.get(admin + "/engines").json()["engines"]}

    wait_until(lambda: states()["l4"]["health"] == "healthy", timeout=20, message="l4 added and healthy")
    capacities = {engine_id: engine["capacity"] for engine_id, engine in states().items()}
    assert capacities["l4"] == 1.0 and capacities["h100"] > 3.0  # relative to the slowest (L4)

    routes = set()
    for _ in range(12):
        raw = api.completions.with_raw_response.create(model="llama-3-8b", prompt="hi", max_tokens=2)
        routes.add(raw.headers["x-fleetserve-route"].split(";")[0])
    assert routes <= {"h100", "l4"} and "h100" in routes

    assert httpx.delete(admin + "/engines/h100").status_code == 200
    assert httpx.delete(admin + "/engines/h100").status_code == 404
    for _ in range(3):
        raw = api.completions.with_raw_response.create(model="llama-3-8b", prompt="hi", max_tokens=2)
        assert raw.headers["x-fleetserve-route"].startswith("l4;")
    assert h100_entry["url"] == h100.url and l4_entry["gpu"] == "l4"
