"""Precise prefix mode through the public entry points: emulated engines started from a fleet file with
`kv_events: true` publish KV events, `fleetserve serve` (whose fleet file says `kv_events: true` for the
same engines) follows them, and its cache-aware policy routes to the engine that holds a prompt even when
the gateway never routed that prompt there: the blocks came from a request sent to the engine directly."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from tests.helpers import free_port, port_is_free, wait_until
from tests.integration.gateway_harness import Process, Processes, answers, metric_value

from fleetserve.config import kv_event_ports

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
ENGINES = {"h100": "h100-80g", "a100": "a100-80g", "l4": "l4"}
SYSTEM = "You are a careful assistant who answers questions about serving large language models. " * 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, dict[str, str]]]:
    tmp_path = tmp_path_factory.mktemp("precise_prefix")
    procs = Processes(tmp_path)
    try:
        ports: dict[str, int] = {}
        while len(ports) < len(ENGINES):  # the engines also bind their HTTP port + 1000 and + 2000
            port = free_port()
            if all(map(port_is_free, kv_event_ports(port))) and port not in ports.values():
                ports[list(ENGINES)[len(ports)]] = port
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        groups = [
            {
                "name": name,
                "model": MODEL,
                "gpu": gpu,
                "port": ports[name],
                "time_scale": 0.02,
                "kv_events": True,
            }
            for name, gpu in ENGINES.items()
        ]
        engine_file = tmp_path / "engines.yaml"
        engine_file.write_text(yaml.safe_dump({"engines": groups}))
        procs._spawn(
            [str(FLEETSERVE), "engine", "emulate", "--fleet", str(engine_file)], urls["h100"], "engines"
        )
        for name, url in urls.items():
            wait_until(lambda u=url: answers(u + "/v1/models"), 60, message=f"{name} up")
        gateway = procs.gateway(
            [
                {"name": name, "model": MODEL, "gpu": gpu, "url": urls[name], "kv_events": True}
                for name, gpu in ENGINES.items()
            ],
            router={"policy": "prefix_aware"},
        )
        yield gateway, urls
    finally:
        procs.close()


def complete(base_url: str, prompt: str) -> openai.APIResponse:
    api = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    raw = api.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert raw.parse().usage.completion_tokens == 4
    return raw


def test_gateway_routes_to_blocks_it_learned_only_from_engine_kv_events(
    fleet: tuple[Process, dict[str, str]],
) -> None:
    gateway, urls = fleet
    for engine in ENGINES:
        wait_until(
            lambda e=engine: metric_value(gateway, "fleetserve_engine_routable", engine=e) == 1,
            30,
            message=f"{engine} routable",
        )
    # the engines start empty: the followed index has nothing for any of them
    assert all(
        metric_value(gateway, "fleetserve_engine_prefix_index_blocks", engine=engine) == 0
        for engine in ENGINES
    )
    complete(urls["l4"], SYSTEM + "What is a KV cache?")  # straight to the engine, not through the gateway
    wait_until(
        lambda: (metric_value(gateway, "fleetserve_engine_prefix_index_blocks", engine="l4") or 0) > 0,
        30,
        message="the gateway's index to learn l4's blocks from its KV events",
    )
    assert (metric_value(gateway, "fleetserve_kv_events_batches_total", engine="l4") or 0) >= 1

    raw = complete(gateway.url, SYSTEM + "And what is paged attention?")
    engine, _, reason = raw.headers["x-fleetserve-route"].partition(";")
    assert (engine, reason) == ("l4", "cache_hit")
