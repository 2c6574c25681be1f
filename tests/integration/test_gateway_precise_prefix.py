"""Precise prefix mode through the public entry points: emulated engines started from a fleet file with
`kv_events: true` publish KV events, `fleetserve serve` (whose fleet file says `kv_events: true` for the
same engines) follows them, and its cache-aware policy routes to the engine that holds a prompt even when
the gateway never routed that prompt there: the blocks came from a request sent to the engine directly.

Three tokenizers: the built-in one, and a real tokenizer.json named in the fleet file or given to
`engine emulate --tokenizer`; with a real one the gateway must hash prompts with it too (the fleet file's
`tokenizer:`). The tokenizer.json is trained here in memory (byte-level BPE, `tokenizers` package):
nothing is downloaded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from tests.helpers import free_port, port_is_free, wait_until
from tests.integration.gateway_harness import Process, Processes, answers, metric_value
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetserve.config import kv_event_ports
from fleetserve.model.catalog import default_catalog
from fleetserve.protocol.tokenizer import HashTokenizer

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
ENGINES = {"h100": "h100-80g", "a100": "a100-80g", "l4": "l4"}
SYSTEM = "You are a careful assistant who answers questions about serving large language models. " * 12


@dataclass
class Fleet:
    gateway: Process
    urls: dict[str, str]
    tokenizer: Path | None


def make_tokenizer_json(path: Path) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(
        [SYSTEM, "What is a KV cache? And what is paged attention?"], trainer=trainer
    )
    tokenizer.save(str(path))
    return path


def event_publishing_ports() -> dict[str, int]:
    """An HTTP port per engine whose KV-event ports (HTTP port + 1000 and + 2000) are free too."""
    ports: dict[str, int] = {}
    while len(ports) < len(ENGINES):
        port = free_port()
        if all(map(port_is_free, kv_event_ports(port))) and port not in ports.values():
            ports[list(ENGINES)[len(ports)]] = port
    return ports


@pytest.fixture(scope="module", params=["builtin", "fleet_file", "command_line"])
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp_path = tmp_path_factory.mktemp(f"precise_prefix_{request.param}")
    tokenizer = None if request.param == "builtin" else make_tokenizer_json(tmp_path / "tokenizer.json")
    procs = Processes(tmp_path)
    try:
        ports = event_publishing_ports()
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
        argv = [str(FLEETSERVE), "engine", "emulate", "--fleet", str(tmp_path / "engines.yaml")]
        if request.param == "command_line":
            argv += ["--tokenizer", str(tokenizer)]
        elif request.param == "fleet_file":
            groups[0]["tokenizer"] = (
                "tokenizer.json"  # relative to the fleet file; the other lines inherit it
            )
        (tmp_path / "engines.yaml").write_text(yaml.safe_dump({"engines": groups}))
        procs._spawn(argv, urls["h100"], "engines")
        for name, url in urls.items():
            wait_until(lambda u=url: answers(u + "/v1/models"), 60, message=f"{name} up")
        gateway_engines = [
            {"name": name, "model": MODEL, "gpu": gpu, "url": urls[name], "kv_events": True}
            for name, gpu in ENGINES.items()
        ]
        if tokenizer is not None:
            gateway_engines[0]["tokenizer"] = str(tokenizer)
        gateway = procs.gateway(gateway_engines, router={"policy": "prefix_aware"})
        yield Fleet(gateway, urls, tokenizer)
    finally:
        procs.close()


def complete(base_url: str, prompt: str) -> openai.APIResponse:
    api = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    raw = api.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert raw.parse().usage.completion_tokens == 4
    return raw


def test_engines_count_with_the_configured_tokenizer(fleet: Fleet) -> None:
    if fleet.tokenizer is None:
        expected = HashTokenizer(default_catalog().model(MODEL).vocab_size).encode(SYSTEM)
    else:
        expected = Tokenizer.from_file(str(fleet.tokenizer)).encode(SYSTEM, add_special_tokens=False).ids
    for url in fleet.urls.values():
        assert httpx.post(url + "/tokenize", json={"prompt": SYSTEM}).json()["tokens"] == expected


def test_gateway_routes_to_blocks_it_learned_only_from_engine_kv_events(fleet: Fleet) -> None:
    gateway = fleet.gateway
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
    complete(fleet.urls["l4"], SYSTEM + "What is a KV cache?")  # straight to the engine, not the gateway
    wait_until(
        lambda: (metric_value(gateway, "fleetserve_engine_prefix_index_blocks", engine="l4") or 0) > 0,
        30,
        message="the gateway's index to learn l4's blocks from its KV events",
    )
    assert (metric_value(gateway, "fleetserve_kv_events_batches_total", engine="l4") or 0) >= 1
    # a scrape taken while that request ran would leave l4 looking busy, and the bounded load would
    # rightly send the next request elsewhere: wait for a scrape that saw it finish
    wait_until(
        lambda: all(
            not metric_value(gateway, f"fleetserve_engine_{state}", engine="l4")
            for state in ("running", "waiting")
        ),
        30,
        message="the gateway's scrape to see l4 idle again",
    )

    raw = complete(gateway.url, SYSTEM + "And what is paged attention?")
    engine, _, reason = raw.headers["x-fleetserve-route"].partition(";")
    assert (engine, reason) == ("l4", "cache_hit")
