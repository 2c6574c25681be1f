"""Every routing policy live: a gateway in front of three real emulated engines (one process, started
once for the module), each policy picked per request with x-fleetserve-policy, and one picked by the
fleet file. A request through the openai client must succeed and the x-fleetserve-route debug header
must name a fleet engine and the policy's reason."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml
from tests.helpers import free_port, wait_until
from tests.integration.gateway_harness import Process, Processes, answers, metric_value

from fleetserve.routing import POLICIES

FLEETSERVE = Path(sys.executable).with_name("fleetserve")
MODEL = "llama-3-8b"
ENGINES = {"h100": "h100-80g", "a100": "a100-80g", "l4": "l4"}
SYSTEM = "You are a careful assistant who answers questions about serving large language models. " * 12


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Processes]]:
    """The engines and a gateway whose fleet file selects `scored` with explicit scorer weights."""
    tmp_path = tmp_path_factory.mktemp("routing_live")
    procs = Processes(tmp_path)
    try:
        ports = {name: free_port() for name in ENGINES}
        groups = [
            {"name": name, "model": MODEL, "gpu": gpu, "port": ports[name], "time_scale": 0.02}
            for name, gpu in ENGINES.items()
        ]
        engine_file = tmp_path / "engines.yaml"
        engine_file.write_text(yaml.safe_dump({"engines": groups}))
        argv = [str(FLEETSERVE), "engine", "emulate", "--fleet", str(engine_file)]
        procs._spawn(argv, f"http://127.0.0.1:{ports['h100']}", "engines")
        for name, port in ports.items():
            wait_until(lambda p=port: answers(f"http://127.0.0.1:{p}/v1/models"), 60, message=f"{name} up")
        gateway = procs.gateway(
            [
                {"name": name, "model": MODEL, "gpu": gpu, "url": f"http://127.0.0.1:{ports[name]}"}
                for name, gpu in ENGINES.items()
            ],
            router={
                "policy": "scored",
                "params": {"scorers": {"queue": 2, "kv": 2, "prefix": 3}},
                "allow_policy_header": True,
            },
        )
        yield gateway, procs
    finally:
        procs.close()


def client(gateway: Process, policy: str | None = None, **headers: str) -> openai.OpenAI:
    if policy is not None:
        headers["x-fleetserve-policy"] = policy
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key="unused", max_retries=0, default_headers=headers
    )


def chat(api: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[str, str]:
    """(engine, reason) the gateway routed one chat request to."""
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=4)
    answer = raw.parse()
    assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens == 4
    engine, _, reason = raw.headers["x-fleetserve-route"].partition(";")
    return engine, reason


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_routes_a_request(fleet: tuple[Process, Processes], policy: str) -> None:
    gateway, _ = fleet
    engine, reason = chat(client(gateway, policy), [{"role": "user", "content": f"Hello from {policy}"}])
    assert engine in ENGINES and reason
    assert (
        metric_value(gateway, "fleetserve_gateway_routing_decisions_total", policy=policy, reason=reason) or 0
    ) >= 1


def test_fleet_file_policy_applies_without_a_header(fleet: tuple[Process, Processes]) -> None:
    gateway, _ = fleet
    engine, reason = chat(client(gateway), [{"role": "user", "content": "no header"}])
    assert engine in ENGINES and reason.startswith("scored_")


def test_later_chat_turns_hit_the_engine_holding_earlier_turns(fleet: tuple[Process, Processes]) -> None:
    # the gateway hashes the rendered conversation, so turn 2 starts with turn 1's blocks
    gateway, _ = fleet
    api = client(gateway, "prefix_aware")
    turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a KV cache?"}]
    first, _ = chat(api, turn)
    turn += [{"role": "assistant", "content": "A cache of keys."}, {"role": "user", "content": "And paging?"}]
    second, reason = chat(api, turn)
    assert (second, reason) == (first, "cache_hit")


def test_a_session_sticks_to_its_engine(fleet: tuple[Process, Processes]) -> None:
    gateway, _ = fleet
    api = client(gateway, "session", **{"x-session-id": "conversation-42"})
    routes = {chat(api, [{"role": "user", "content": f"turn {i}"}]) for i in range(3)}
    assert len(routes) == 1 and next(iter(routes))[1] == "session_owner"
