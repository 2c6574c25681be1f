"""A real tokenizer.json named in the fleet file, through the public entry points: emulated engines started
with `fleetserve engine emulate --fleet` count tokens with it and publish KV events of those token ids,
and `fleetserve serve` (whose fleet file names the same tokenizer) hashes prompts with it, so its precise
prefix index matches the engines' blocks and a cache-aware policy routes a prompt to the engine holding
its prefix although the gateway never routed that prefix there.

The tokenizer.json is trained here in memory (byte-level BPE, `tokenizers` package): nothing is
downloaded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from tests.helpers import free_port, port_is_free, wait_until
from tests.integration.gateway_harness import Process, Processes, answers, metric_value
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetserve.config import kv_event_ports

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
ENGINES = {"h100": "h100-80g", "l4": "l4"}
SYSTEM = "You are a helpful assistant. The quick brown fox jumps over the lazy dog. " * 12


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


def start_fleet(tmp_path: Path, *, on_command_line: bool) -> tuple[Processes, Process, dict[str, str], Path]:
    """Emulated engines whose tokenizer comes from their fleet file (or from `--tokenizer`), and a gateway
    following their KV events whose fleet file names the same tokenizer."""
    tokenizer = make_tokenizer_json(tmp_path / "tokenizer.json")
    procs = Processes(tmp_path)
    ports: dict[str, int] = {}
    while len(ports) < len(ENGINES):  # the engines also bind their HTTP port + 1000 and + 2000
        port = free_port()
        if all(map(port_is_free, kv_event_ports(port))) and port not in ports.values():
            ports[list(ENGINES)[len(ports)]] = port
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    groups = [
        {"name": name, "model": MODEL, "gpu": gpu, "port": ports[name], "time_scale": 0.02, "kv_events": True}
        for name, gpu in ENGINES.items()
    ]
    argv = [str(FLEETSERVE), "engine", "emulate", "--fleet", str(tmp_path / "engines.yaml")]
    if on_command_line:
        argv += ["--tokenizer", str(tokenizer)]
    else:
        groups[0]["tokenizer"] = "tokenizer.json"  # relative to the fleet file; the l4 line inherits it
    (tmp_path / "engines.yaml").write_text(yaml.safe_dump({"engines": groups}))
    procs._spawn(argv, urls["h100"], "engines")
    try:
        for name, url in urls.items():
            wait_until(lambda u=url: answers(u + "/v1/models"), 60, message=f"{name} up")
        gateway = procs.gateway(
            [
                {
                    "name": name,
                    "model": MODEL,
                    "gpu": gpu,
                    "url": urls[name],
                    "kv_events": True,
                    "tokenizer": str(tokenizer),
                }
                for name, gpu in ENGINES.items()
            ],
            router={"policy": "prefix_aware"},
        )
    except BaseException:
        procs.close()
        raise
    return procs, gateway, urls, tokenizer


@pytest.fixture(scope="module", params=["fleet_file", "command_line"])
def fleet(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, dict[str, str], Path]]:
    tmp_path = tmp_path_factory.mktemp(f"tokenizer_{request.param}")
    procs, gateway, urls, tokenizer = start_fleet(tmp_path, on_command_line=request.param == "command_line")
    try:
        yield gateway, urls, tokenizer
    finally:
        procs.close()


def complete(base_url: str, prompt: str) -> openai.APIResponse:
    api = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    raw = api.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert raw.parse().usage.completion_tokens == 4
    return raw


def test_engines_count_with_the_fleet_tokenizer(fleet: tuple[Process, dict[str, str], Path]) -> None:
    _, urls, tokenizer = fleet
    expected = Tokenizer.from_file(str(tokenizer)).encode(SYSTEM, add_special_tokens=False).ids
    for url in urls.values():
        assert httpx.post(url + "/tokenize", json={"prompt": SYSTEM}).json()["tokens"] == expected


def test_gateway_hashes_prompts_like_the_engines(fleet: tuple[Process, dict[str, str], Path]) -> None:
    gateway, urls, _ = fleet
    for engine in ENGINES:
        wait_until(
            lambda e=engine: metric_value(gateway, "fleetserve_engine_routable", engine=e) == 1,
            30,
            message=f"{engine} routable",
        )
    complete(urls["l4"], SYSTEM + "What is a KV cache?")  # straight to the engine, not through the gateway
    wait_until(
        lambda: (metric_value(gateway, "fleetserve_engine_prefix_index_blocks", engine="l4") or 0) > 0,
        30,
        message="the gateway's index to learn l4's blocks from its KV events",
    )
    raw = complete(gateway.url, SYSTEM + "And what is paged attention?")
    engine, _, reason = raw.headers["x-fleetserve-route"].partition(";")
    assert (engine, reason) == ("l4", "cache_hit")
